//! AttnBlock — the "Attn Blocking" test-time defence of Subramanya et al. (2024), as the
//! paper's Appendix A.2 configures it (results in its Table 13).
//!
//! For every test image x: a GradRollout map (Gildenblat 2020) of the backdoored model is
//! computed for its predicted class; a square patch (30×30 pixels at 224², scaled with the
//! image size) centred on the map's maximum is zeroed — shifted to stay inside the image —
//! and the backdoored model classifies the blocked image x'.
//!
//! GradRollout, per block l: the attention A_l [H, N, N] is fused with its gradient as
//! mean_h(A_l ⊙ ∂y_c/∂A_l), negative values are set to 0, the lowest `discard_ratio` of the
//! entries are dropped, and â_l = (fused + I)/2 is normalised row-wise; the rollout is
//! R = â_L ⋯ â_1, and the map is the [CLS] row of R over the patch tokens.
//! Deviation from the reference script, which divides by the row sums along the wrong axis
//! (a broadcasting slip): rows are normalised here, as attention rollout defines it.
//!
//! The gradient A ⊙ ∂y/∂A is read from a probe: the attention is multiplied by a tensor of
//! ones that requires grad, whose gradient is exactly that product (first-order autodiff
//! suffices).

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use serde_json::Value;

use super::{Defence, Settings};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Vit;
use crate::spec::plan::CellPlan;
use crate::train::{View, rng_for, views};

/// AttnBlock in the registry: a test-time defence. It trains nothing; the cell evaluates
/// the no-defence model with every input blocked.
pub struct AttnBlock;

impl Defence for AttnBlock {
    fn name(&self) -> &'static str {
        "attnblock"
    }
    fn default_settings(&self) -> Option<Value> {
        AttnBlockSettings::defaults()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        AttnBlockSettings::checked(settings).map(|_| ())
    }
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String> {
        let ab = AttnBlockSettings::of(settings)?;
        cell.eval.attnblock = Some(ab.at_size(cell.ds.scale.image_size));
        cell.undefended()
    }
}

/// AttnBlock settings of a spec (`defaults.attnblock`, or a variant's `attnblock:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttnBlockSettings {
    /// Side of the zeroed patch in pixels at 224×224 (30 in the paper); scaled to the
    /// image size of the run.
    pub patch_at_224: usize,
    /// GradRollout's discard ratio (Gildenblat's default 0.9).
    pub discard_ratio: f64,
}

impl Default for AttnBlockSettings {
    fn default() -> Self {
        Self {
            patch_at_224: 30,
            discard_ratio: 0.9,
        }
    }
}

impl Settings for AttnBlockSettings {
    fn validate(&self) -> Result<(), String> {
        if self.patch_at_224 == 0 || self.patch_at_224 > 224 {
            return Err(format!(
                "patch_at_224 {} is not in 1..=224",
                self.patch_at_224
            ));
        }
        if !(0.0..1.0).contains(&self.discard_ratio) {
            return Err(format!(
                "discard_ratio {} is not in [0, 1)",
                self.discard_ratio
            ));
        }
        Ok(())
    }
}

impl AttnBlockSettings {
    /// The evaluation parameters at a given image size.
    pub fn at_size(&self, image_size: usize) -> AttnBlockEval {
        let patch = (self.patch_at_224 as f64 * image_size as f64 / 224.0).round() as usize;
        AttnBlockEval {
            patch: patch.clamp(1, image_size),
            discard_ratio: self.discard_ratio,
        }
    }
}

/// What the `evaluate` step needs: the patch side in pixels at the run's size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttnBlockEval {
    pub patch: usize,
    pub discard_ratio: f64,
}

/// GradRollout of one image from its per-block fused maps (each N×N, row-major, already
/// head-averaged A ⊙ ∂y/∂A). Returns the [CLS] row of the rollout over the N − 1 patches.
pub fn grad_rollout(fused: &[Vec<f32>], n: usize, discard_ratio: f64) -> Vec<f32> {
    let mut result = identity(n);
    for layer in fused {
        let mut a: Vec<f32> = layer.iter().map(|&v| v.max(0.0)).collect();
        let drop = (a.len() as f64 * discard_ratio) as usize;
        if drop > 0 {
            let mut order: Vec<usize> = (0..a.len()).collect();
            order.sort_by(|&i, &j| a[i].total_cmp(&a[j]).then(i.cmp(&j)));
            for &i in &order[..drop] {
                a[i] = 0.0;
            }
        }
        for i in 0..n {
            a[i * n + i] += 1.0;
        }
        for row in a.chunks_mut(n) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        result = matmul(&a, &result, n);
    }
    result[1..n].to_vec()
}

fn identity(n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}

fn matmul(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// Top-left corner of a `patch`-sided square centred on (cy, cx), shifted to lie inside a
/// `size`-sided image.
pub fn block_origin(cy: usize, cx: usize, patch: usize, size: usize) -> (usize, usize) {
    let place = |c: usize| c.saturating_sub(patch / 2).min(size - patch);
    (place(cy), place(cx))
}

/// Zeroes the square patch at `origin` in a CHW u8 image.
pub fn zero_patch(img: &mut [u8], size: usize, origin: (usize, usize), patch: usize) {
    for c in 0..3 {
        for y in origin.0..origin.0 + patch {
            let row = c * size * size + y * size;
            img[row + origin.1..row + origin.1 + patch].fill(0);
        }
    }
}

/// The blocked copies x' of the images `idx` of `set` (`model` on an autodiff device `ad`).
fn blocked_batch(
    model: &Vit,
    set: &ImageSet,
    idx: &[usize],
    meta: &DatasetMeta,
    p: &AttnBlockEval,
    ad: &Device,
) -> ImageSet {
    let size = set.size;
    let ps = model.patch_size();
    let grid = size / ps;
    let n = grid * grid + 1;
    let b = idx.len();
    let heads = model.heads();
    let mut rng = rng_for(0, 0, 0, 0);
    let x = views(set, idx, &[View::NoAug], meta, &mut rng, ad)
        .pop()
        .unwrap();
    let probes: Vec<Tensor<4>> = (0..model.depth())
        .map(|_| Tensor::<4>::ones([b, heads, n, n], ad).require_grad())
        .collect();
    let logits = model.forward_probed(x, &probes);
    // y_c for the predicted class c of each image (GradRollout's category mask).
    let pred = softmax(logits.clone().detach(), 1).argmax(1); // [B, 1]
    let score = logits.gather(1, pred).sum();
    let grads = score.backward();
    let fused: Vec<Vec<f32>> = probes
        .iter()
        .map(|p| {
            let g = p.grad(&grads).expect("probe gradient");
            // Mean over heads: [B, H, N, N] -> [B, N, N].
            g.mean_dim(1)
                .to_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap()
        })
        .collect();
    let mut out = set.subset(idx);
    for bi in 0..b {
        let per_layer: Vec<Vec<f32>> = fused
            .iter()
            .map(|f| f[bi * n * n..(bi + 1) * n * n].to_vec())
            .collect();
        let map = grad_rollout(&per_layer, n, p.discard_ratio);
        let best = map
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (gy, gx) = (best / grid, best % grid);
        let (cy, cx) = (gy * ps + ps / 2, gx * ps + ps / 2);
        let origin = block_origin(cy, cx, p.patch, size);
        zero_patch(out.image_mut(bi), size, origin, p.patch);
    }
    out
}

/// Predictions (class, max probability) of the backdoored model on the blocked images.
/// `model` lives on the autodiff device of `device`.
pub fn predict_blocked(
    model: &Vit,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    p: &AttnBlockEval,
    device: &Device,
) -> Vec<(usize, f32)> {
    let ad = device.clone().autodiff();
    let mut out = Vec::with_capacity(set.len());
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch) {
        let blocked = blocked_batch(model, set, chunk, meta, p, &ad);
        out.extend(crate::train::predict(model, &blocked, meta, batch, device));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_of_identity_layers_is_uniform_over_patches() {
        // Fused maps of zeros: each layer is (0 + I)/2 row-normalised = I, so the [CLS]
        // row has no mass on patches.
        let n = 5;
        let zero = vec![0f32; n * n];
        let m = grad_rollout(&[zero.clone(), zero], n, 0.0);
        assert_eq!(m, vec![0.0; 4]);
    }

    #[test]
    fn rollout_on_a_hand_computed_layer() {
        // N = 3 ([CLS] + 2 patches), one layer, no discarding. [CLS] attends to patch 2
        // with weight 1 and there is a negative entry that must be clamped.
        let n = 3;
        let layer = vec![
            0.0, 0.0, 1.0, //
            0.0, 0.0, -1.0, //
            0.0, 0.0, 0.0,
        ];
        let m = grad_rollout(&[layer], n, 0.0);
        // Row 0 of (A + I) = [1, 0, 1] → normalised [0.5, 0, 0.5].
        assert_eq!(m, vec![0.0, 0.5]);
        // Discarding 90% of the 9 entries (8 lowest, ties by index) keeps only the 1.0.
        let layer = vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0];
        let m = grad_rollout(&[layer], n, 0.9);
        assert_eq!(m, vec![0.0, 0.5]);
    }

    #[test]
    fn patch_is_shifted_inside_the_image() {
        assert_eq!(block_origin(16, 16, 4, 32), (14, 14));
        assert_eq!(block_origin(0, 31, 4, 32), (0, 28));
        let mut img = vec![9u8; 3 * 4 * 4];
        zero_patch(&mut img, 4, block_origin(3, 3, 2, 4), 2);
        let zeros = img.iter().filter(|&&v| v == 0).count();
        assert_eq!(zeros, 3 * 4);
        assert_eq!(img[2 * 4 + 2], 0);
        assert_eq!(img[0], 9);
        assert_eq!(
            AttnBlockSettings::default().at_size(224),
            AttnBlockEval {
                patch: 30,
                discard_ratio: 0.9
            }
        );
        assert_eq!(AttnBlockSettings::default().at_size(32).patch, 4);
    }

    #[test]
    fn probe_gradient_is_attention_times_its_gradient() {
        // The probe's gradient equals A ⊙ ∂L/∂A for L = Σ w ⊙ A.
        let device = Device::flex().autodiff();
        let a = Tensor::<4>::from_data(
            TensorData::new(vec![0.2f32, 0.8, 0.6, 0.4], [1, 1, 2, 2]),
            &device,
        );
        let w = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let probe = Tensor::<4>::ones([1, 1, 2, 2], &device).require_grad();
        let grads = (a * probe.clone() * w).sum().backward();
        let g: Vec<f32> = probe.grad(&grads).unwrap().to_data().try_to_vec().unwrap();
        let want = [0.2f32, 1.6, 1.8, 1.6];
        assert!(
            g.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6),
            "{g:?}"
        );
    }
}
