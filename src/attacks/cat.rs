//! CAT — the Channel Activation aTtack, an adaptive attack against IEU (Mo et al., 2024;
//! paper Appendix D and Table 18, reference notes §2.12).
//!
//! Gray-box: the attacker holds an f_p tuned exactly as the defender would tune it (our
//! `stage1` step on the *base* attack's poisoned data, with the spec's IEU settings), and
//! adds to every poisoned training image of the base attack (`base:`, default
//! badnets-white; Table 18 uses badnets-pattern, badnets-white, blended, smooth and
//! trojan-sq, written `cat+<base>` in a grid) an adversarial perturbation that makes f_p's
//! channel activations on it look like those on clean images. Labels, the clean images and
//! the ASR test set (the ordinary, unperturbed trigger, as the reference tests it) are the
//! base attack's.
//!
//! The reference trains two 4-block ViT heads on f_p's block-0 tokens (a backdoor
//! discriminator and a target classifier) and runs PGD ascending
//! L = (1 − γ)·CE(disc(x'), backdoor) − γ·CE(cls(x'), y), γ = 0.6. We keep that objective
//! with heads that need no training:
//! - the discriminator is the linear probe through the class means of f_p's channel
//!   activations φ(x) (its final-norm tokens averaged over tokens, one value per channel):
//!   s(x) = w·(φ(x) − m)/τ with w = (μ_p − μ_c)/‖μ_p − μ_c‖, m = (μ_p + μ_c)/2,
//!   τ = ‖μ_p − μ_c‖/2, where μ_p and μ_c average φ over the base attack's poisoned and
//!   clean tune images (the attacker knows which it poisoned; the reference labels every
//!   target-class image "backdoor"); CE(disc, backdoor) = softplus(−s);
//! - the target classifier is f_p's own head with the poisoned label y = target.
//!
//! PGD (no random masking, as the paper): 10 iterations, ℓ2 budget ε = 16/255 in [0,1]
//! pixel units (`l2_budget: 16` in 0–255 units), step α = 1.85·ε/iterations, projection onto
//! the ε-ball and clipping to [0,1] after each step. The reference steps by sign(∇); we step
//! along ∇/‖∇‖₂ (the usual ℓ2 PGD), because a sign step spreads the budget evenly over all
//! pixels (≈0.3 grey levels each at 32×32), which vanishes when the image is stored as u8.
//! The reference stores float tensors; we store u8 images, so the float perturbation is
//! quantised by a greedy rule that keeps ‖Δ‖₂ ≤ ε exactly: pixels in decreasing order of
//! |δ| get max(1, round(|δ|)) grey levels of δ's sign while the budget lasts.
//!
//! The step also writes `cat_stats.json`: the objective before PGD, after it (float) and
//! after quantisation, f_p's mean confidence and the fraction of perturbed images its gate
//! would flag (max σ > 0.95) before and after, and the perturbations' mean ℓ2 norm.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::prelude::*;
use burn::tensor::activation::{softmax, softplus};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Poisoned, TriggerFiles};
use crate::data::{DatasetMeta, ImageSet};
use crate::defences::Settings;
use crate::models::Vit;
use crate::report::preview::{Preview, PreviewCache};
use crate::spec::plan::{PoisonPlan, SpecFiles};

/// CAT in the registry.
pub struct Cat;

impl Attack for Cat {
    fn name(&self) -> &'static str {
        "cat"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<CatSettings>()
    }
    /// The ranges, and a base CAT can perturb: a registered attack that takes no base.
    fn check(&self, settings: &Value) -> Result<(), String> {
        let s = CatSettings::checked(settings)?;
        if super::registered(&s.base).is_none_or(|b| b.takes_base()) {
            return Err(format!(
                "base: '{}' is not an attack CAT can perturb",
                s.base
            ));
        }
        Ok(())
    }
    /// `cat+<base>` names the base in a grid.
    fn takes_base(&self) -> bool {
        true
    }
    fn params(&self, settings: &Value, _: &mut SpecFiles) -> Result<AttackParams> {
        AttackParams::new(self.name(), &CatSettings::of(settings)?)
    }
    /// The base attack's poison step, an f_p tuned on it as the defender would (the spec's
    /// IEU settings), and the CAT poison step that reads both.
    fn plan(&self, cx: &mut PoisonPlan, settings: &Value) -> Result<String> {
        let s = CatSettings::of(settings)?;
        let base = cx
            .base
            .map(str::to_string)
            .unwrap_or_else(|| s.base.clone());
        let base_key = cx.poison_of(&base)?;
        let spec = cx.ds.spec;
        let ieu = spec
            .spec
            .ieu_defaults_at(Some(cx.ds.dataset), Some(cx.ds.scale))
            .map_err(|e| anyhow!("{}: {e}", spec.origin))?;
        let fp_key = crate::defences::ieu::plan_stage1(
            cx.plan,
            cx.ds,
            &ieu,
            &format!("attack {}", cx.label),
            &base,
            &base_key,
        )?;
        let params = AttackParams::new(self.name(), &CatSettings { base, ..s })?;
        cx.poison(params, &[("base", &base_key), ("stage1", &fp_key)])
    }
    fn run(
        &self,
        p: &PoisonParams,
        inputs: &PoisonInputs,
        out: &Path,
        device: &Device,
    ) -> Result<usize> {
        run(p, inputs, out, device)
    }
    /// The base attack's image perturbed against a throwaway f_p (see [`preview_attacker`]).
    fn preview(&self, cx: &Preview, cache: &mut PreviewCache, clean: &[u8]) -> Result<Vec<u8>> {
        let c = CatSettings::of(&self.default_settings())?;
        let base_attack = super::registered(&c.base)
            .ok_or_else(|| anyhow!("cat: unknown base attack '{}'", c.base))?;
        let base = cx.params(super::default_params(base_attack)?);
        let size = cx.pool.size;
        let trigger = base_attack.trigger(&base, size, &TriggerFiles::default())?;
        let attacker = cache.cached("cat", || preview_attacker(cx, base_attack, &base, &c))?;
        let mut x = clean.to_vec();
        trigger.apply(&mut x, size);
        let mut b = ImageSet::new(size);
        b.push(&x, cx.target as u16);
        let base_set = Poisoned {
            tune: b,
            indices: vec![0],
            noise_indices: Vec::new(),
            test: ImageSet::new(size),
        };
        let (r, _) = perturb(attacker, &c, &base_set)?;
        Ok(r.tune.image(0).to_vec())
    }
}

/// CAT settings of a spec (`defaults.attacks.cat`), which are also its step parameters
/// (with the base a `cat+<base>` grid entry names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatSettings {
    /// The attack whose poisoned images are perturbed.
    pub base: String,
    /// γ of Mo et al.'s Eq. 3: the weight of the target-class term.
    pub gamma: f64,
    pub iterations: usize,
    /// ℓ2 budget in 0–255 pixel units (16 = the paper's 16/255 on [0,1] images).
    pub l2_budget: f64,
}

impl Default for CatSettings {
    fn default() -> Self {
        Self {
            base: "badnets-white".into(),
            gamma: 0.6,
            iterations: 10,
            l2_budget: 16.0,
        }
    }
}

impl Settings for CatSettings {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(format!("gamma: {} is not in [0, 1]", self.gamma));
        }
        if self.iterations < 1 {
            return Err("iterations: must be at least 1".into());
        }
        if !(self.l2_budget > 0.0 && self.l2_budget.is_finite()) {
            return Err(format!(
                "l2_budget: {} must be a positive number",
                self.l2_budget
            ));
        }
        Ok(())
    }
}

/// The attacker's model: f_p and the class means of its channel activations.
pub struct Attacker {
    pub fp: Vit,
    /// Unit direction from the clean to the poisoned activation mean.
    w: Vec<f32>,
    mid: Vec<f32>,
    tau: f32,
    mean: [f32; 3],
    std: [f32; 3],
    target: usize,
    gamma: f64,
}

fn to_tensor(x01: &[f32], b: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(x01.to_vec(), [b, 3, size, size]), device)
}

fn u8_to_01(img: &[u8]) -> impl Iterator<Item = f32> + '_ {
    img.iter().map(|&p| p as f32 / 255.0)
}

impl Attacker {
    fn normalise(&self, x01: Tensor<4>) -> Tensor<4> {
        let device = x01.device();
        let m = Tensor::<1>::from_data(TensorData::new(self.mean.to_vec(), [3]), &device)
            .reshape([1, 3, 1, 1]);
        let s = Tensor::<1>::from_data(TensorData::new(self.std.to_vec(), [3]), &device)
            .reshape([1, 3, 1, 1]);
        (x01 - m) / s
    }

    /// Channel activations φ(x): f_p's final-norm tokens averaged over tokens, [B, d].
    pub fn channels(fp: &Vit, x: Tensor<4>) -> Tensor<2> {
        let h = fp.features(x);
        let [b, _, d] = h.dims();
        h.mean_dim(1).reshape([b, d])
    }

    /// Builds the attacker from f_p and the base attack's poisoned tune set.
    pub fn new(
        fp: Vit,
        tune: &ImageSet,
        indices: &[usize],
        meta: &DatasetMeta,
        target: usize,
        gamma: f64,
    ) -> Self {
        let mut a = Self {
            fp,
            w: Vec::new(),
            mid: Vec::new(),
            tau: 1.0,
            mean: meta.mean,
            std: meta.std,
            target,
            gamma,
        };
        let valid = a.fp.valid();
        let device = valid.patch_embed.weight.val().device();
        let mut is_p = vec![false; tune.len()];
        for &i in indices {
            is_p[i] = true;
        }
        let (mut sp, mut sc) = (Vec::<f64>::new(), Vec::<f64>::new());
        let (mut np, mut nc) = (0usize, 0usize);
        let idx: Vec<usize> = (0..tune.len()).collect();
        for chunk in idx.chunks(256) {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| u8_to_01(tune.image(i)))
                .collect();
            let x = a.normalise(to_tensor(&x, chunk.len(), tune.size, &device));
            let phi = Self::channels(&valid, x);
            let d = phi.dims()[1];
            let v: Vec<f32> = phi.to_data().convert::<f32>().try_to_vec().unwrap();
            if sp.is_empty() {
                sp = vec![0.0; d];
                sc = vec![0.0; d];
            }
            for (row, &i) in v.chunks(d).zip(chunk) {
                let (acc, n) = if is_p[i] {
                    (&mut sp, &mut np)
                } else {
                    (&mut sc, &mut nc)
                };
                for (s, &r) in acc.iter_mut().zip(row) {
                    *s += r as f64;
                }
                *n += 1;
            }
        }
        let mu_p: Vec<f64> = sp.iter().map(|s| s / np.max(1) as f64).collect();
        let mu_c: Vec<f64> = sc.iter().map(|s| s / nc.max(1) as f64).collect();
        let diff: Vec<f64> = mu_p.iter().zip(&mu_c).map(|(p, c)| p - c).collect();
        let norm = diff.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-8);
        a.w = diff.iter().map(|v| (v / norm) as f32).collect();
        a.mid = mu_p
            .iter()
            .zip(&mu_c)
            .map(|(p, c)| ((p + c) / 2.0) as f32)
            .collect();
        a.tau = (norm / 2.0) as f32;
        a
    }

    /// Per-image objective J = γ·CE(f_p(x), target) − (1 − γ)·softplus(−s(x)), which PGD
    /// lowers (J = −L of the reference's ascent). `x01` is [B,3,H,W] in [0,1].
    pub fn objective(&self, fp: &Vit, x01: Tensor<4>) -> Tensor<1> {
        let device = x01.device();
        let b = x01.dims()[0];
        let x = self.normalise(x01);
        let phi = Self::channels(fp, x.clone());
        let d = self.w.len();
        let w =
            Tensor::<1>::from_data(TensorData::new(self.w.clone(), [d]), &device).reshape([d, 1]);
        let mid =
            Tensor::<1>::from_data(TensorData::new(self.mid.clone(), [d]), &device).reshape([1, d]);
        let s: Tensor<1> = (phi - mid).matmul(w).reshape([b]).div_scalar(self.tau);
        let y =
            Tensor::<1, Int>::from_data(TensorData::new(vec![self.target as i64; b], [b]), &device);
        let ce = crate::train::cross_entropy_per_sample(fp.forward(x), y);
        ce.mul_scalar(self.gamma) - softplus(s.neg(), 1.0).mul_scalar(1.0 - self.gamma)
    }

    /// Mean objective and f_p's max softmax per image (no gradient).
    pub fn evaluate(&self, x01: &[f32], b: usize, size: usize) -> (Vec<f32>, Vec<f32>) {
        let fp = self.fp.valid();
        let device = fp.patch_embed.weight.val().device();
        let x = to_tensor(x01, b, size, &device);
        let j: Vec<f32> = self
            .objective(&fp, x.clone())
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let conf: Vec<f32> = softmax(fp.forward(self.normalise(x)), 1)
            .max_dim(1)
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        (j, conf)
    }

    /// ℓ2 PGD from `x0` (B images, [0,1], flattened): returns the perturbed images, each
    /// within ‖x − x0‖₂ ≤ eps and [0,1].
    pub fn pgd(&self, x0: &[f32], b: usize, size: usize, iterations: usize, eps: f64) -> Vec<f32> {
        let device = self.fp.patch_embed.weight.val().device();
        let per = 3 * size * size;
        let alpha = (1.85 * eps / iterations.max(1) as f64) as f32;
        let eps = eps as f32;
        let mut x = x0.to_vec();
        for _ in 0..iterations {
            let xt = to_tensor(&x, b, size, &device).require_grad();
            let j = self.objective(&self.fp, xt.clone()).sum();
            let grads = j.backward();
            let g: Vec<f32> = xt
                .grad(&grads)
                .expect("input gradient")
                .to_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap();
            for k in 0..b {
                let r = k * per..(k + 1) * per;
                let gn = g[r.clone()].iter().map(|v| v * v).sum::<f32>().sqrt();
                if gn == 0.0 || !gn.is_finite() {
                    continue;
                }
                let mut delta: Vec<f32> = r
                    .clone()
                    .map(|i| x[i] - x0[i] - alpha * g[i] / gn)
                    .collect();
                let dn = delta.iter().map(|v| v * v).sum::<f32>().sqrt();
                if dn > eps {
                    let f = eps / dn;
                    delta.iter_mut().for_each(|v| *v *= f);
                }
                for (i, dv) in r.zip(delta) {
                    x[i] = (x0[i] + dv).clamp(0.0, 1.0);
                }
            }
        }
        x
    }
}

/// Rounds a perturbed image back to u8 with ‖Δ‖₂ ≤ `budget` (0–255 units) guaranteed: the
/// pixels with the largest |δ| get max(1, round(|δ|)) grey levels of δ's sign while the
/// budget lasts; clipping to [0, 255] can only shrink a change.
pub fn quantise(base: &[u8], adv01: &[f32], budget: f64) -> Vec<u8> {
    let delta: Vec<f64> = base
        .iter()
        .zip(adv01)
        .map(|(&b, &a)| a as f64 * 255.0 - b as f64)
        .collect();
    let mut order: Vec<usize> = (0..delta.len()).filter(|&i| delta[i] != 0.0).collect();
    order.sort_by(|&a, &b| delta[b].abs().total_cmp(&delta[a].abs()).then(a.cmp(&b)));
    let mut out = base.to_vec();
    let mut left = budget * budget;
    for i in order {
        let mut m = delta[i].abs().round().max(1.0);
        while m >= 1.0 && m * m > left {
            m -= 1.0;
        }
        if m < 1.0 {
            break;
        }
        left -= m * m;
        let v = base[i] as f64 + m * delta[i].signum();
        out[i] = v.clamp(0.0, 255.0) as u8;
    }
    out
}

/// Summary written as `cat_stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CatStats {
    pub perturbed: usize,
    pub objective_before: f64,
    pub objective_after_pgd: f64,
    pub objective_after_u8: f64,
    pub fp_confidence_before: f64,
    pub fp_confidence_after: f64,
    /// Perturbed images f_p's gate would flag at c_thresh 0.95, in %.
    pub flagged_before_pct: f64,
    pub flagged_after_pct: f64,
    /// Mean ‖Δ‖₂ of the stored (u8) perturbations, 0–255 units.
    pub l2_mean: f64,
    pub l2_budget: f64,
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

fn flagged(conf: &[f32]) -> f64 {
    100.0 * conf.iter().filter(|&&c| c > 0.95).count() as f64 / conf.len().max(1) as f64
}

/// Perturbs the poisoned images of `base` (indices `indices`); every other image, the
/// labels and the test set are kept.
pub fn perturb(
    attacker: &Attacker,
    c: &CatSettings,
    base: &Poisoned,
) -> Result<(Poisoned, CatStats)> {
    let size = base.tune.size;
    let per = 3 * size * size;
    let eps = c.l2_budget / 255.0;
    let mut tune = base.tune.clone();
    let (mut jb, mut ja, mut jq, mut cb, mut cq) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut l2 = 0.0;
    for chunk in base.indices.chunks(64) {
        let b = chunk.len();
        let x0: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| u8_to_01(base.tune.image(i)))
            .collect();
        let (j0, c0) = attacker.evaluate(&x0, b, size);
        let adv = attacker.pgd(&x0, b, size, c.iterations, eps);
        let (j1, _) = attacker.evaluate(&adv, b, size);
        let mut q01 = Vec::with_capacity(b * per);
        for (k, &i) in chunk.iter().enumerate() {
            let q = quantise(
                base.tune.image(i),
                &adv[k * per..(k + 1) * per],
                c.l2_budget,
            );
            l2 += q
                .iter()
                .zip(base.tune.image(i))
                .map(|(&a, &o)| (a as f64 - o as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            q01.extend(u8_to_01(&q));
            tune.image_mut(i).copy_from_slice(&q);
        }
        let (j2, c2) = attacker.evaluate(&q01, b, size);
        jb.extend(j0);
        ja.extend(j1);
        jq.extend(j2);
        cb.extend(c0);
        cq.extend(c2);
    }
    if jb.iter().chain(&ja).any(|v| !v.is_finite()) {
        bail!("cat: non-finite PGD objective");
    }
    let n = base.indices.len();
    let stats = CatStats {
        perturbed: n,
        objective_before: mean(&jb),
        objective_after_pgd: mean(&ja),
        objective_after_u8: mean(&jq),
        fp_confidence_before: mean(&cb),
        fp_confidence_after: mean(&cq),
        flagged_before_pct: flagged(&cb),
        flagged_after_pct: flagged(&cq),
        l2_mean: l2 / n.max(1) as f64,
        l2_budget: c.l2_budget,
    };
    Ok((
        Poisoned {
            tune,
            indices: base.indices.clone(),
            noise_indices: base.noise_indices.clone(),
            test: base.test.clone(),
        },
        stats,
    ))
}

/// The `poison` step of CAT: inputs are the dataset step, the base attack's poison step
/// (`base`) and the `stage1` f_p tuned on it; also writes `cat_stats.json`.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, device: &Device) -> Result<usize> {
    let c: CatSettings = p.attack.fields()?;
    let meta = crate::data::load_meta(&inputs.dataset)?;
    let base_dir = inputs.input("base")?;
    let noise_path = base_dir.join("noise_indices.json");
    let base = Poisoned {
        tune: ImageSet::load(&base_dir.join("tune.safetensors"))?,
        indices: super::load_poison_indices(base_dir)?,
        noise_indices: if noise_path.is_file() {
            serde_json::from_str(&std::fs::read_to_string(&noise_path)?)?
        } else {
            Vec::new()
        },
        test: ImageSet::load(&base_dir.join("test.safetensors"))?,
    };
    let ad = device.clone().autodiff();
    let (fp, _) = crate::models::load_vit(inputs.input("stage1")?, &ad)?;
    let attacker = Attacker::new(fp, &base.tune, &base.indices, &meta, p.target, c.gamma);
    let (res, st) = perturb(&attacker, &c, &base)?;
    super::write_poisoned(&res, out)?;
    crate::store::write_json(&out.join("cat_stats.json"), &st)?;
    tracing::info!(
        "    CAT objective {:.3} -> {:.3} (u8 {:.3}); gate-flagged {:.1}% -> {:.1}%; mean l2 {:.2}/255",
        st.objective_before,
        st.objective_after_pgd,
        st.objective_after_u8,
        st.flagged_before_pct,
        st.flagged_after_pct,
        st.l2_mean
    );
    Ok(st.perturbed)
}

/// The preview's attacker: a fresh one-block ViT of the scale's width tuned for 3 epochs
/// on the preview's pool poisoned by the base attack.
fn preview_attacker(
    cx: &Preview,
    base_attack: &dyn Attack,
    base: &PoisonParams,
    c: &CatSettings,
) -> Result<Attacker> {
    let ad = crate::default_device().autodiff();
    let empty = ImageSet::new(cx.pool.size);
    let poisoned = base_attack.poison(base, cx.pool, &empty, &TriggerFiles::default())?;
    let m = &cx.scale.model;
    let cfg = crate::models::VitConfig {
        image_size: cx.pool.size,
        patch_size: m.patch_size,
        dim: m.dim,
        depth: 1,
        heads: m.heads,
        mlp_ratio: m.mlp_ratio,
        num_classes: cx.meta.num_classes(),
    };
    let epochs = 3;
    let iters = crate::train::iters_per_epoch(poisoned.tune.len(), 32) * epochs;
    let sup = crate::train::Supervised {
        label: "preview f_p",
        epochs,
        batch_size: 32,
        views: &[crate::train::View::NoAug],
        lr: vec![1e-3; iters],
        wd: vec![0.0; iters],
        seed: 0,
        keep_last: false,
    };
    let fp = Vit::new(&cfg, 0, &ad);
    let (fp, _) = crate::train::train_supervised(
        fp,
        &poisoned.tune,
        cx.meta,
        &sup,
        crate::train::LossKind::Ce,
        &ad,
    )?;
    Ok(Attacker::new(
        fp,
        &poisoned.tune,
        &poisoned.indices,
        cx.meta,
        cx.target,
        c.gamma,
    ))
}

#[cfg(test)]
mod tests;
