//! I-BAU — Implicit Backdoor Adversarial Unlearning (Zeng et al. 2021b), configured as in
//! the paper's Appendix A.2: the backdoored model (the no-defence finetune of the same
//! cell) is unlearned with clean images from the test split (5000 in the paper, the I-BAU
//! default), an Adam outer optimiser and tuned outer/inner learning rates.
//!
//! The minimax problem min_θ max_δ L(f(x + δ; θ), y) is solved as in the I-BAU defence code,
//! for `rounds` rounds:
//! 1. **Inner maximisation**: a universal perturbation δ (one per round, in [0, 1] pixel
//!    units) is found by one epoch of SGD (`inner_lr`) over the clean set on
//!    −ℓ(f(x + δ), ŷ) + 10⁻³‖δ‖², with ŷ the model's own predictions, then projected onto
//!    the ℓ2 ball of radius `pert_radius` (10).
//! 2. **Outer minimisation** with the implicit hypergradient, one Adam step (`outer_lr`) per
//!    clean batch. δ is treated as the fixed point of Φ(δ, θ) = δ − α∇_δ L_in(δ, θ) with
//!    L_in = −ℓ(f(x₀ + δ), y₀) + 10⁻⁴‖δ‖² on the first clean batch and α = `fixed_point_lr`
//!    (0.1); the outer loss L_out = ℓ(f(x_b + m⊙δ), y_b) adds δ to a random 1% of the batch
//!    (at least one image). The hypergradient is
//!    ∇_θ L_out + (∂Φ/∂θ)ᵀ v = ∇_θ L_out − α ∇²_θδ L_in · v, where v solves
//!    v = (∂Φ/∂δ)ᵀ v + ∇_δ L_out = v − α ∇²_δδ L_in · v + ∇_δ L_out, approximated by
//!    `fixed_point_iters` (K = 5) iterations from v = 0 — the `hypergrad.fixed_point`
//!    routine I-BAU uses.
//!
//! **Second-order terms with first-order autodiff.** Burn differentiates once, so both
//! Hessian-vector products come from central differences of gradients along v:
//! ∇²_δδ L_in · v ≈ [∇_δ L_in(δ + hv) − ∇_δ L_in(δ − hv)] / 2h and
//! ∇²_θδ L_in · v ≈ [∇_θ L_in(δ + hv) − ∇_θ L_in(δ − hv)] / 2h, with h chosen so that
//! ‖hv‖ = `fd_step`. Both come from the same two gradient evaluations, so a hypergradient
//! costs 2K + 1 forward/backward passes. The error is O(h²·‖v‖³·∂³L) plus float rounding of
//! order ε_f32·‖∇L‖/h; on quadratics the differences are exact, which the tests use to check
//! the fixed-point algebra against the closed-form implicit gradient.
//!
//! **Interpretation of the paper's "inner_lr".** The paper tunes (outer_lr, inner_lr) and
//! picks (5·10⁻⁵, 5) for CIFAR10/GTSRB and (5·10⁻⁵, 10) for TinyImageNet. We read inner_lr as
//! the SGD learning rate of the inner maximisation (10 in the I-BAU code) and keep the
//! fixed-point map's step at the code's 0.1.

use std::path::Path;

use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

use serde_json::Value;

use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams, Settings};
use crate::data::ImageSet;
use crate::models::Vit;
use crate::progress::Progress;
use crate::spec::plan::CellPlan;
use crate::train::{Optimiser, View, cross_entropy, labels, rng_for, views};

/// I-BAU in the registry.
pub struct Ibau;

impl Defence for Ibau {
    fn name(&self) -> &'static str {
        "ibau"
    }
    fn default_settings(&self) -> Option<Value> {
        IbauSettings::defaults()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        IbauSettings::checked(settings).map(|_| ())
    }
    /// Post-training: unlearns the cell's no-defence model.
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String> {
        let ib = IbauSettings::of(settings)?;
        let b = &cell.ds.scale.baselines;
        let ip = IbauParams {
            rounds: ib.rounds,
            fixed_point_iters: ib.fixed_point_iters,
            fixed_point_lr: ib.fixed_point_lr,
            outer_lr: ib
                .outer_lr
                .unwrap_or_else(|| cell.per_dataset(&b.ibau_outer_lr)),
            inner_lr: ib
                .inner_lr
                .unwrap_or_else(|| cell.per_dataset(&b.ibau_inner_lr)),
            clean_images: ib.clean_images.unwrap_or(b.ibau_clean_images),
            batch_size: ib.batch_size,
            pert_radius: ib.pert_radius,
            patch_fraction: ib.patch_fraction,
            fd_step: ib.fd_step,
        };
        let none_key = cell.undefended()?;
        cell.finetune(
            DefenceParams::new("ibau", &ip)?,
            &[("backdoored", &none_key)],
        )
    }
    fn run(
        &self,
        p: &FinetuneParams,
        inputs: &FinetuneInputs,
        out: &Path,
        device: &Device,
    ) -> Result<()> {
        run(p, inputs, out, device)
    }
}

/// I-BAU settings of a spec (`defaults.ibau`, or a variant's `ibau:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IbauSettings {
    pub rounds: usize,
    /// K, the fixed-point iterations of the implicit hypergradient.
    pub fixed_point_iters: usize,
    /// α of the fixed-point map Φ(δ, θ) = δ − α∇_δ L_in.
    pub fixed_point_lr: f64,
    /// `null` takes the scale's `baselines.ibau_outer_lr`.
    pub outer_lr: Option<f64>,
    /// `null` takes the scale's `baselines.ibau_inner_lr`.
    pub inner_lr: Option<f64>,
    /// Clean test images used; `null` takes the scale's `baselines.ibau_clean_images`.
    pub clean_images: Option<usize>,
    pub batch_size: usize,
    /// ℓ2 radius of the universal perturbation, in [0, 1] pixel units.
    pub pert_radius: f64,
    /// Fraction of each outer batch that carries the perturbation.
    pub patch_fraction: f64,
    /// ‖hv‖ of the central differences.
    pub fd_step: f64,
}

impl Default for IbauSettings {
    fn default() -> Self {
        Self {
            rounds: 5,
            fixed_point_iters: 5,
            fixed_point_lr: 0.1,
            outer_lr: None,
            inner_lr: None,
            clean_images: None,
            batch_size: 100,
            pert_radius: 10.0,
            patch_fraction: 0.01,
            fd_step: 1e-2,
        }
    }
}

impl Settings for IbauSettings {
    fn validate(&self) -> Result<(), String> {
        let pos = |v: f64| v > 0.0 && v.is_finite();
        for (name, v) in [
            ("fixed_point_lr", Some(self.fixed_point_lr)),
            ("outer_lr", self.outer_lr),
            ("inner_lr", self.inner_lr),
            ("pert_radius", Some(self.pert_radius)),
            ("fd_step", Some(self.fd_step)),
        ] {
            if let Some(v) = v
                && !pos(v)
            {
                return Err(format!("{name} {v} must be a positive number"));
            }
        }
        if !(self.patch_fraction > 0.0 && self.patch_fraction <= 1.0) {
            return Err(format!(
                "patch_fraction {} is not in (0, 1]",
                self.patch_fraction
            ));
        }
        if self.rounds == 0 || self.fixed_point_iters == 0 || self.batch_size == 0 {
            return Err("rounds, fixed_point_iters and batch_size must be at least 1".into());
        }
        if self.clean_images == Some(0) {
            return Err("clean_images must be at least 1".into());
        }
        Ok(())
    }
}

/// Resolved I-BAU parameters of a `finetune` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IbauParams {
    pub rounds: usize,
    pub fixed_point_iters: usize,
    pub fixed_point_lr: f64,
    pub outer_lr: f64,
    pub inner_lr: f64,
    pub clean_images: usize,
    pub batch_size: usize,
    pub pert_radius: f64,
    pub patch_fraction: f64,
    pub fd_step: f64,
}

/// A bilevel problem in flat vectors: δ (inner variable) and θ (outer variable, implicit).
pub trait Bilevel {
    /// (∇_δ L_in, ∇_θ L_in) at δ and the current θ.
    fn inner_grads(&mut self, delta: &[f32]) -> Result<(Vec<f32>, Vec<f32>)>;
    /// (∇_δ L_out, ∇_θ L_out) at δ and the current θ.
    fn outer_grads(&mut self, delta: &[f32]) -> Result<(Vec<f32>, Vec<f32>)>;
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Central differences of the inner gradients along v: (∇²_δδ L_in·v, ∇²_θδ L_in·v).
fn second_order<P: Bilevel>(
    p: &mut P,
    delta: &[f32],
    v: &[f32],
    theta_len: usize,
    fd_step: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let nv = norm(v);
    if nv == 0.0 {
        return Ok((vec![0.0; v.len()], vec![0.0; theta_len]));
    }
    let h = fd_step / nv;
    let shifted = |s: f64| -> Vec<f32> {
        delta
            .iter()
            .zip(v)
            .map(|(&d, &x)| (d as f64 + s * x as f64) as f32)
            .collect()
    };
    let (dp, tp) = p.inner_grads(&shifted(h))?;
    let (dm, tm) = p.inner_grads(&shifted(-h))?;
    let diff = |a: &[f32], b: &[f32]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64) / (2.0 * h))
            .collect()
    };
    Ok((diff(&dp, &dm), diff(&tp, &tm)))
}

/// The implicit hypergradient of L_out(δ*(θ), θ) with δ* a fixed point of
/// Φ(δ, θ) = δ − α∇_δ L_in(δ, θ), by `k` fixed-point iterations for v (see the module doc).
pub fn hypergradient<P: Bilevel>(
    p: &mut P,
    delta: &[f32],
    alpha: f64,
    k: usize,
    fd_step: f64,
) -> Result<Vec<f32>> {
    let (g_delta, g_theta) = p.outer_grads(delta)?;
    let mut v = vec![0f32; delta.len()];
    for _ in 0..k {
        let (hv, _) = second_order(p, delta, &v, g_theta.len(), fd_step)?;
        v = v
            .iter()
            .zip(&hv)
            .zip(&g_delta)
            .map(|((&vi, &hvi), &gi)| (vi as f64 - alpha * hvi + gi as f64) as f32)
            .collect();
    }
    let (_, mixed) = second_order(p, delta, &v, g_theta.len(), fd_step)?;
    Ok(g_theta
        .iter()
        .zip(&mixed)
        .map(|(&g, &m)| (g as f64 - alpha * m) as f32)
        .collect())
}

// ---------------------------------------------------------------------------------------
// Flat views of a model's parameters and gradients

struct Flatten<'a> {
    grads: &'a GradientsParams,
    out: Vec<f32>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.val().shape().num_elements();
        match self.grads.get::<D>(param.id) {
            Some(g) => self.out.extend(
                g.to_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 gradient"),
            ),
            None => self.out.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

struct Unflatten<'a> {
    flat: &'a [f32],
    offset: usize,
    device: Device,
    out: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let dims: [usize; D] = param.val().dims();
        let n: usize = dims.iter().product();
        let values = self.flat[self.offset..self.offset + n].to_vec();
        self.offset += n;
        self.out.register(
            param.id,
            Tensor::<D>::from_data(TensorData::new(values, dims), &self.device),
        );
    }
}

fn flatten<M: Module>(model: &M, grads: &GradientsParams) -> Vec<f32> {
    let mut f = Flatten {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut f);
    f.out
}

fn unflatten<M: Module>(model: &M, flat: &[f32], device: &Device) -> GradientsParams {
    let mut u = Unflatten {
        flat,
        offset: 0,
        device: device.clone(),
        out: GradientsParams::new(),
    };
    model.visit(&mut u);
    u.out
}

// ---------------------------------------------------------------------------------------
// I-BAU on a ViT

/// Normalised images [B,3,H,W] and labels of a batch.
struct Batch {
    x: Tensor<4>,
    y: Tensor<1, Int>,
}

struct VitBilevel<'a> {
    model: &'a Vit,
    inner: &'a Batch,
    outer: &'a Batch,
    /// 1 for the outer images that carry δ: [B, 1, 1, 1].
    outer_mask: Tensor<4>,
    /// 1/std per channel [1, 3, 1, 1]: δ is in [0, 1] pixel units, inputs are normalised.
    inv_std: Tensor<4>,
    size: usize,
    ad: Device,
}

impl VitBilevel<'_> {
    fn delta(&self, d: &[f32]) -> Tensor<4> {
        Tensor::<4>::from_data(
            TensorData::new(d.to_vec(), [1, 3, self.size, self.size]),
            &self.ad,
        )
        .require_grad()
    }

    fn grads(&self, loss: Tensor<1>, delta: &Tensor<4>) -> Result<(Vec<f32>, Vec<f32>)> {
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            bail!("i-bau: non-finite loss {value}");
        }
        let grads = loss.backward();
        let gd: Vec<f32> = delta
            .grad(&grads)
            .expect("gradient of the perturbation")
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let gt = flatten(self.model, &GradientsParams::from_grads(grads, self.model));
        Ok((gd, gt))
    }
}

impl Bilevel for VitBilevel<'_> {
    fn inner_grads(&mut self, d: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let delta = self.delta(d);
        let x = self.inner.x.clone() + delta.clone() * self.inv_std.clone();
        let ce = cross_entropy(self.model.forward(x), self.inner.y.clone());
        let reg = delta.clone().powi_scalar(2).sum().mul_scalar(1e-4);
        self.grads(ce.neg() + reg, &delta)
    }

    fn outer_grads(&mut self, d: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let delta = self.delta(d);
        let x =
            self.outer.x.clone() + self.outer_mask.clone() * (delta.clone() * self.inv_std.clone());
        let ce = cross_entropy(self.model.forward(x), self.outer.y.clone());
        self.grads(ce, &delta)
    }
}

/// What an I-BAU run did, written to `train_stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IbauStats {
    /// ‖δ‖₂ of each round's universal perturbation after projection.
    pub pert_norms: Vec<f64>,
    /// Accuracy (%) of the model on the clean set with δ added, per round, before the
    /// outer steps of that round.
    pub adv_accuracy: Vec<f64>,
    pub outer_steps: usize,
    /// The first this many clean test images were used (evaluation reports CA without them).
    pub clean_test_images_used: usize,
}

/// The `finetune` step with `defence: ibau` (I-BAU on the no-defence model).
pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let ip: IbauParams = p.defence.fields()?;
    unlearn(
        &ip,
        p.seed,
        &inputs.dataset,
        inputs.input("backdoored")?,
        out,
        device,
    )
}

/// Runs I-BAU on the backdoored model in `backdoored`; writes the unlearned model.
pub fn unlearn(
    p: &IbauParams,
    seed: u64,
    dataset: &Path,
    backdoored: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let meta = crate::data::load_meta(dataset)?;
    let test = ImageSet::load(&dataset.join("test.safetensors"))?;
    if test.is_empty() {
        bail!("i-bau needs clean test images, but the test split is empty");
    }
    let n_clean = p.clean_images.min(test.len());
    let clean = test.subset(&(0..n_clean).collect::<Vec<_>>());
    let ad = device.clone().autodiff();
    let (mut model, cfg) = crate::models::load_vit(backdoored, &ad)?;
    let size = clean.size;
    let inv_std = Tensor::<4>::from_data(
        TensorData::new(
            meta.std.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(),
            [1, 3, 1, 1],
        ),
        &ad,
    );
    let chunks: Vec<Vec<usize>> = (0..clean.len())
        .collect::<Vec<_>>()
        .chunks(p.batch_size)
        .map(|c| c.to_vec())
        .collect();
    let mut rng = rng_for(seed, 0, 0, 0x1BA0);
    let batches: Vec<Batch> = chunks
        .iter()
        .map(|c| Batch {
            x: views(&clean, c, &[View::NoAug], &meta, &mut rng, &ad)
                .pop()
                .unwrap(),
            y: labels(&clean, c, &ad),
        })
        .collect();
    let mut outer_opt = Optimiser::adam();
    let mut stats = IbauStats {
        clean_test_images_used: n_clean,
        ..Default::default()
    };
    let progress = Progress::new("i-bau", (p.rounds * batches.len()) as u64);
    let dim = 3 * size * size;
    for round in 0..p.rounds {
        // 1. Inner maximisation: one SGD epoch on the universal perturbation.
        let mut delta = vec![0f32; dim];
        for b in &batches {
            let pred = model.valid().forward(b.x.clone().inner()).argmax(1);
            let pred = Tensor::<1, Int>::from_data(pred.reshape([b.x.dims()[0]]).into_data(), &ad);
            let dt =
                Tensor::<4>::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &ad)
                    .require_grad();
            let x = b.x.clone() + dt.clone() * inv_std.clone();
            let loss = cross_entropy(model.forward(x), pred).neg()
                + dt.clone().powi_scalar(2).sum().mul_scalar(1e-3);
            let grads = loss.backward();
            let g: Vec<f32> = dt
                .grad(&grads)
                .unwrap()
                .to_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap();
            for (d, gi) in delta.iter_mut().zip(g) {
                *d -= p.inner_lr as f32 * gi;
            }
        }
        let n = norm(&delta);
        if !n.is_finite() {
            bail!(
                "i-bau: the universal perturbation diverged in round {round} (inner_lr too high?)"
            );
        }
        let shrink = (p.pert_radius / n.max(1e-12)).min(1.0) as f32;
        delta.iter_mut().for_each(|d| *d *= shrink);
        stats.pert_norms.push(norm(&delta));
        stats
            .adv_accuracy
            .push(adv_accuracy(&model, &batches, &delta, &inv_std, size, &ad));

        // 2. Outer minimisation with the implicit hypergradient, one step per batch.
        for (bi, outer) in batches.iter().enumerate() {
            let nb = outer.x.dims()[0];
            let k = ((nb as f64 * p.patch_fraction) as usize).clamp(1, nb);
            let mut mask = vec![0f32; nb];
            for i in sample(&mut rng_for(seed, round, bi, 0x1BA1), nb, k) {
                mask[i] = 1.0;
            }
            let outer_mask = Tensor::<4>::from_data(TensorData::new(mask, [nb, 1, 1, 1]), &ad);
            let mut problem = VitBilevel {
                model: &model,
                inner: &batches[0],
                outer,
                outer_mask,
                inv_std: inv_std.clone(),
                size,
                ad: ad.clone(),
            };
            let g = hypergradient(
                &mut problem,
                &delta,
                p.fixed_point_lr,
                p.fixed_point_iters,
                p.fd_step,
            )?;
            if g.iter().any(|v| !v.is_finite()) {
                bail!("i-bau: non-finite hypergradient in round {round}, batch {bi}");
            }
            let grads = unflatten(&model, &g, device);
            model = outer_opt.apply(model, grads, p.outer_lr, 0.0);
            stats.outer_steps += 1;
            progress.inc(format!("round {}/{}", round + 1, p.rounds));
        }
    }
    progress.finish();
    crate::models::save_with_stats(&model.valid(), &cfg, &stats, out)
}

fn adv_accuracy(
    model: &Vit,
    batches: &[Batch],
    delta: &[f32],
    inv_std: &Tensor<4>,
    size: usize,
    ad: &Device,
) -> f64 {
    let dt = Tensor::<4>::from_data(TensorData::new(delta.to_vec(), [1, 3, size, size]), ad);
    let mut ok = 0usize;
    let mut n = 0usize;
    for b in batches {
        let x = b.x.clone() + dt.clone() * inv_std.clone();
        let pred = model.forward(x).argmax(1).reshape([b.x.dims()[0]]);
        let eq: Vec<bool> = pred.equal(b.y.clone()).to_data().try_to_vec().unwrap();
        ok += eq.iter().filter(|&&e| e).count();
        n += eq.len();
    }
    100.0 * ok as f64 / n.max(1) as f64
}

#[cfg(test)]
mod tests;
