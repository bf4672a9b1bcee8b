//! The one inference helper: a model's logits on every (unaugmented) image of a set, in
//! chunks, without autodiff. Predictions, IEU's gate, ABL's per-image losses and the
//! confidences of the figures are all read from it.

use burn::prelude::*;
use rayon::prelude::*;

use super::{View, rng_for, views};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Classifier;

/// Logits of every image of a set, row-major [N, C].
#[derive(Debug, Clone)]
pub struct Logits {
    pub values: Vec<f32>,
    pub classes: usize,
}

impl Logits {
    pub fn len(&self) -> usize {
        self.values.len() / self.classes.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.classes..(i + 1) * self.classes]
    }
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.values.chunks(self.classes.max(1))
    }
    /// Argmax class and max softmax probability of each row.
    pub fn predictions(&self) -> Vec<(usize, f32)> {
        self.rows()
            .map(|r| {
                let (arg, _) =
                    r.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                            if v > best.1 { (i, v) } else { best }
                        });
                (arg, max_softmax(r))
            })
            .collect()
    }
    /// Cross-entropy −log σ(ŷ)_y of each row against the set's labels.
    pub fn cross_entropy(&self, labels: &[u16]) -> Vec<f32> {
        self.rows()
            .zip(labels)
            .map(|(r, &y)| cross_entropy_row(r, y as usize))
            .collect()
    }
}

/// Runs `model` (without autodiff) on every image of `set`, unaugmented, `batch` at a time;
/// each batch's [`super::SHARDS`] shards run in parallel (in evaluation mode every
/// architecture's logits are per image).
pub fn logits<M: Classifier>(
    model: &M,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    device: &Device,
) -> Logits {
    let model = model.valid();
    let mut values = Vec::new();
    let mut classes = 0;
    let idx: Vec<usize> = (0..set.len()).collect();
    let shards = super::SHARDS;
    for chunk in idx.chunks(batch.max(1)) {
        let n = chunk.len();
        let parts: Vec<(Vec<f32>, usize)> = (0..shards)
            .into_par_iter()
            .filter(|s| s * n / shards < (s + 1) * n / shards)
            .map(|s| {
                let part = &chunk[s * n / shards..(s + 1) * n / shards];
                let mut rng = rng_for(0, 0, 0, 0);
                let x = views(set, part, &[View::NoAug], meta, &mut rng, device)
                    .pop()
                    .expect("one view");
                let out = model.forward(x);
                let c = out.dims()[1];
                let v = out
                    .to_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 logits");
                (v, c)
            })
            .collect();
        for (v, c) in parts {
            classes = c;
            values.extend(v);
        }
    }
    Logits { values, classes }
}

/// Argmax class and max softmax probability of every image (unaugmented), in order.
pub fn predict<M: Classifier>(
    model: &M,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    device: &Device,
) -> Vec<(usize, f32)> {
    logits(model, set, meta, batch, device).predictions()
}

/// Fraction (in %) of images predicted as their label.
pub fn accuracy(pred: &[(usize, f32)], set: &ImageSet) -> f64 {
    if pred.is_empty() {
        return 0.0;
    }
    let ok = pred
        .iter()
        .zip(&set.labels)
        .filter(|((p, _), l)| *p == **l as usize)
        .count();
    100.0 * ok as f64 / pred.len() as f64
}

/// log Σ exp(ℓ_i), computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    m + logits.iter().map(|&l| (l - m).exp()).sum::<f32>().ln()
}

/// max σ(ℓ): the confidence IEU's gate thresholds.
pub fn max_softmax(logits: &[f32]) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    1.0 / logits.iter().map(|&l| (l - m).exp()).sum::<f32>()
}

/// −log σ(ℓ)_y.
pub fn cross_entropy_row(logits: &[f32], y: usize) -> f32 {
    log_sum_exp(logits) - logits[y]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_helpers_on_hand_computed_values() {
        assert!((max_softmax(&[1000.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!((max_softmax(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
        assert!((cross_entropy_row(&[0.0, 0.0], 1) - 2f32.ln()).abs() < 1e-6);
        assert!((log_sum_exp(&[3f32.ln(), 0.0]) - 4f32.ln()).abs() < 1e-6);
        let l = Logits {
            values: vec![0.0, 2.0, 1.0, 5.0, 0.0, 0.0],
            classes: 3,
        };
        assert_eq!(l.len(), 2);
        let p = l.predictions();
        assert_eq!((p[0].0, p[1].0), (1, 0));
        assert!(
            (l.cross_entropy(&[1, 0])[1] - cross_entropy_row(&[5.0, 0.0, 0.0], 0)).abs() < 1e-6
        );
    }
}
