//! ISSBA's encoder/decoder pair and the `stegastamp` step that trains it (see
//! `src/attacks/issba.rs`).

use std::path::Path;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{relu, softplus};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{IssbaSettings, secret};
use crate::data::ImageSet;
use crate::models::vit::Init;
use crate::progress::Progress;

/// Parameters of the `stegastamp` step (its input is the dataset step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StegaParams {
    pub image_size: usize,
    pub secret_len: usize,
    pub eps: f64,
    pub l2_weight: f64,
    /// Convolution width of encoder and decoder.
    pub width: usize,
    /// Clean pretrain-split images trained on (0 = all).
    pub train_images: usize,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl StegaParams {
    pub fn new(a: &IssbaSettings, s: &crate::spec::Scale, seed: u64) -> Self {
        Self {
            image_size: s.image_size,
            secret_len: a.secret_len,
            eps: a.eps,
            l2_weight: a.l2_weight,
            width: s.stegastamp.width,
            train_images: s.stegastamp.train_images,
            epochs: s.stegastamp.epochs,
            lr: s.stegastamp.lr,
            batch_size: s.stegastamp.batch_size,
            seed,
        }
    }
}

fn conv(init: &mut Init, c_in: usize, c_out: usize, k: usize, stride: usize) -> Conv2d {
    let std = (2.0 / (c_in * k * k) as f32).sqrt() / 2.0;
    Conv2d {
        weight: init.normal([c_out, c_in, k, k], std),
        bias: Some(init.zeros([c_out])),
        stride: [stride, stride],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups: 1,
        padding: if k == 1 {
            PaddingConfig2d::Valid
        } else {
            PaddingConfig2d::Explicit(1, 1, 1, 1)
        },
    }
}

fn linear(init: &mut Init, d_in: usize, d_out: usize) -> Linear {
    Linear {
        weight: init.normal([d_in, d_out], (1.0 / d_in as f32).sqrt()),
        bias: Some(init.zeros([d_out])),
    }
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub secret: Linear,
    pub c1: Conv2d,
    pub c2: Conv2d,
    pub c3: Conv2d,
    pub out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub c1: Conv2d,
    pub c2: Conv2d,
    pub fc: Linear,
}

#[derive(Module, Debug)]
pub struct StegaStamp {
    pub enc: Encoder,
    pub dec: Decoder,
}

impl StegaStamp {
    pub fn new(p: &StegaParams, device: &Device) -> Self {
        let (w, n, l) = (p.width, p.image_size, p.secret_len);
        let mut init = Init::new(p.seed ^ 0x57E6A, device);
        let quarter = n.div_ceil(2).div_ceil(2);
        Self {
            enc: Encoder {
                secret: linear(&mut init, l, n * n),
                c1: conv(&mut init, 4, w, 3, 1),
                c2: conv(&mut init, w, w, 3, 1),
                c3: conv(&mut init, w + 4, w, 3, 1),
                out: conv(&mut init, w, 3, 1, 1),
            },
            dec: Decoder {
                c1: conv(&mut init, 3, w, 3, 2),
                c2: conv(&mut init, w, 2 * w, 3, 2),
                fc: linear(&mut init, 2 * w * quarter * quarter, l),
            },
        }
    }
}

impl Encoder {
    /// Images [B,3,H,W] in [0,1] and secrets [B,L] in {0,1} → residuals [B,3,H,W] with
    /// ‖r‖∞ ≤ ε.
    pub fn forward(&self, x: Tensor<4>, s: Tensor<2>, eps: f64) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let plane: Tensor<4> = self
            .secret
            .forward(s.mul_scalar(2.0).sub_scalar(1.0))
            .reshape([b, 1, h, w]);
        let inp = Tensor::cat(vec![x.sub_scalar(0.5), plane], 1);
        let h1 = relu(self.c1.forward(inp.clone()));
        let h2 = relu(self.c2.forward(h1));
        let h3 = relu(self.c3.forward(Tensor::cat(vec![h2, inp], 1)));
        self.out.forward(h3).tanh().mul_scalar(eps)
    }
}

impl Decoder {
    /// Images [B,3,H,W] in [0,1] → secret logits [B,L].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let b = x.dims()[0];
        let h = relu(self.c1.forward(x.sub_scalar(0.5)));
        let h = relu(self.c2.forward(h));
        let [_, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([b, c * hh * ww]))
    }
}

/// Mean binary cross-entropy with logits.
fn bce(logits: Tensor<2>, bits: Tensor<2>) -> Tensor<1> {
    (softplus(logits.clone(), 1.0) - logits * bits).mean()
}

pub(super) fn images01(set: &ImageSet, idx: &[usize], device: &Device) -> Tensor<4> {
    let n = set.size;
    let v: Vec<f32> = idx
        .iter()
        .flat_map(|&i| set.image(i).iter().map(|&p| p as f32 / 255.0))
        .collect();
    Tensor::from_data(TensorData::new(v, [idx.len(), 3, n, n]), device)
}

pub(super) fn bits_tensor(bits: &[u8], rows: usize, len: usize, device: &Device) -> Tensor<2> {
    let v: Vec<f32> = bits.iter().map(|&b| b as f32).collect();
    Tensor::from_data(TensorData::new(v, [rows, len]), device)
}

/// The residual bound while training: 8ε at the start, falling linearly to ε over the first
/// half of the epochs, then ε. A curriculum in the spirit of the reference's (its first
/// epochs train on the secret loss alone): a decoder cannot find an 8/255 residual under
/// the image content from a random start, but learns to read a strong one and then follows
/// it down.
pub fn train_eps(p: &StegaParams, epoch: usize) -> f64 {
    let warm = warmup_epochs(p);
    if epoch < warm {
        p.eps * (1.0 + 7.0 * (1.0 - epoch as f64 / warm as f64))
    } else {
        p.eps
    }
}

/// The first half of the epochs: a large bound and the secret loss alone.
fn warmup_epochs(p: &StegaParams) -> usize {
    (p.epochs / 2).max(1)
}

/// Trains the encoder/decoder pair on `train` (clean images).
pub fn train(p: &StegaParams, train: &ImageSet, device: &Device) -> Result<(StegaStamp, Vec<f64>)> {
    if train.size != p.image_size {
        bail!(
            "stegastamp: images are {}x{}, the step expects {}",
            train.size,
            train.size,
            p.image_size
        );
    }
    let ad = device.clone().autodiff();
    let mut model = StegaStamp::new(p, &ad);
    let mut optim = crate::train::Optimiser::adamw();
    let n = train.len();
    let iters = crate::train::iters_per_epoch(n, p.batch_size);
    let progress = Progress::new("stegastamp", (p.epochs * iters) as u64);
    let mut log = Vec::new();
    for epoch in 0..p.epochs {
        let (mut sum, mut count) = (0.0, 0usize);
        for (bi, batch) in crate::train::epoch_batches(n, p.batch_size, p.seed, epoch)
            .iter()
            .enumerate()
        {
            let mut rng = crate::train::rng_for(p.seed, epoch, bi, 0x57E6);
            let bits: Vec<u8> = (0..batch.len() * p.secret_len)
                .map(|_| rng.random_range(0..2u8))
                .collect();
            let s = bits_tensor(&bits, batch.len(), p.secret_len, &ad);
            let x = images01(train, batch, &ad);
            let r = model.enc.forward(x.clone(), s.clone(), train_eps(p, epoch));
            let encoded = (x + r.clone()).clamp(0.0, 1.0);
            // The reference trains on the secret loss alone at first.
            let l2_weight = if epoch < warmup_epochs(p) {
                0.0
            } else {
                p.l2_weight
            };
            let loss =
                bce(model.dec.forward(encoded), s) + r.powi_scalar(2).mean().mul_scalar(l2_weight);
            let value: f32 = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                bail!("stegastamp: non-finite loss {value} at epoch {epoch}, batch {bi}");
            }
            model = optim.descend(model, loss, p.lr, 0.0);
            sum += value as f64;
            count += 1;
            progress.inc(format!(
                "epoch {}/{} loss {:.3}",
                epoch + 1,
                p.epochs,
                sum / count as f64
            ));
        }
        log.push(sum / count.max(1) as f64);
    }
    progress.finish();
    Ok((model.valid(), log))
}

/// Encodes `images` (CHW u8) with `bits`, rounded back to u8.
pub fn encode(
    model: &StegaStamp,
    p: &StegaParams,
    images: &ImageSet,
    idx: &[usize],
    bits: &[u8],
    device: &Device,
) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(256) {
        let x = images01(images, chunk, device);
        let rows: Vec<u8> = chunk.iter().flat_map(|_| bits.iter().copied()).collect();
        let s = bits_tensor(&rows, chunk.len(), p.secret_len, device);
        let r = model.enc.forward(x.clone(), s, p.eps);
        let y: Vec<f32> = (x + r)
            .clamp(0.0, 1.0)
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let per = 3 * images.size * images.size;
        out.extend(
            y.chunks(per)
                .map(|img| img.iter().map(|&v| (v * 255.0).round() as u8).collect()),
        );
    }
    out
}

/// Fraction of `bits` recovered by the decoder from each image.
pub fn bit_accuracy(
    model: &StegaStamp,
    images: &[Vec<u8>],
    size: usize,
    bits: &[u8],
    device: &Device,
) -> f64 {
    let mut set = ImageSet::new(size);
    for img in images {
        set.push(img, 0);
    }
    let idx: Vec<usize> = (0..set.len()).collect();
    let (mut ok, mut total) = (0usize, 0usize);
    for chunk in idx.chunks(256) {
        let logits: Vec<f32> = model
            .dec
            .forward(images01(&set, chunk, device))
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        for row in logits.chunks(bits.len()) {
            for (l, &b) in row.iter().zip(bits) {
                ok += ((*l > 0.0) == (b == 1)) as usize;
                total += 1;
            }
        }
    }
    ok as f64 / total.max(1) as f64
}

/// What `stats.json` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StegaStats {
    /// Fixed secret recovered from encoded (u8) training images.
    pub bit_acc_train: f64,
    /// Fixed secret recovered from encoded (u8) held-out test images.
    pub bit_acc_heldout: f64,
    /// The decoder on unencoded held-out images (≈ 0.5 means it does not see the secret
    /// in clean images).
    pub bit_acc_clean: f64,
    /// Mean PSNR (dB) of encoded vs clean held-out images.
    pub psnr_mean: f64,
    /// Mean per-image ‖x' − x‖₂ in [0,1] pixel units.
    pub l2_mean: f64,
    /// Max ‖x' − x‖∞ in [0,1] pixel units (≤ ε + 0.5/255 after rounding).
    pub linf_max: f64,
    pub eps: f64,
    pub heldout_images: usize,
    pub loss_per_epoch: Vec<f64>,
}

pub fn stats(
    model: &StegaStamp,
    p: &StegaParams,
    train: &ImageSet,
    heldout: &ImageSet,
    log: Vec<f64>,
    device: &Device,
) -> StegaStats {
    let secret = secret(p.secret_len, p.seed);
    let size = p.image_size;
    let tr: Vec<usize> = (0..train.len().min(512)).collect();
    let ho: Vec<usize> = (0..heldout.len().min(512)).collect();
    let enc_tr = encode(model, p, train, &tr, &secret, device);
    let enc_ho = encode(model, p, heldout, &ho, &secret, device);
    let clean_ho: Vec<Vec<u8>> = ho.iter().map(|&i| heldout.image(i).to_vec()).collect();
    let (mut psnr, mut l2, mut linf) = (0.0, 0.0, 0.0f64);
    for (e, c) in enc_ho.iter().zip(&clean_ho) {
        let d: Vec<f64> = e
            .iter()
            .zip(c)
            .map(|(&a, &b)| (a as f64 - b as f64) / 255.0)
            .collect();
        let sq: f64 = d.iter().map(|v| v * v).sum();
        let mse = sq / d.len() as f64;
        psnr += if mse > 0.0 {
            10.0 * (1.0 / mse).log10()
        } else {
            100.0
        };
        l2 += sq.sqrt();
        linf = d.iter().fold(linf, |m, v| m.max(v.abs()));
    }
    let n = enc_ho.len().max(1) as f64;
    StegaStats {
        bit_acc_train: bit_accuracy(model, &enc_tr, size, &secret, device),
        bit_acc_heldout: bit_accuracy(model, &enc_ho, size, &secret, device),
        bit_acc_clean: bit_accuracy(model, &clean_ho, size, &secret, device),
        psnr_mean: psnr / n,
        l2_mean: l2 / n,
        linf_max: linf,
        eps: p.eps,
        heldout_images: enc_ho.len(),
        loss_per_epoch: log,
    }
}

/// The `stegastamp` step: trains on the dataset step's pretrain split, evaluates on its
/// test split; writes `model.safetensors`, `config.json` and `stats.json`.
pub fn run_stegastamp_step(
    p: &StegaParams,
    dataset_dir: &Path,
    out: &Path,
    device: &Device,
) -> Result<StegaStats> {
    let pre = ImageSet::load(&dataset_dir.join("pretrain.safetensors"))?;
    let pre = if pre.is_empty() {
        // A dataset without a pretrain split: train on the tune split instead.
        ImageSet::load(&dataset_dir.join("tune.safetensors"))?
    } else {
        pre
    };
    let n = if p.train_images == 0 {
        pre.len()
    } else {
        p.train_images.min(pre.len())
    };
    let train_set = pre.subset(&(0..n).collect::<Vec<_>>());
    let test = ImageSet::load(&dataset_dir.join("test.safetensors"))?;
    let (model, log) = train(p, &train_set, device)?;
    let st = stats(&model, p, &train_set, &test, log, device);
    crate::models::save_safetensors(&model, &out.join("model.safetensors"))?;
    crate::store::write_json(&out.join("config.json"), p)?;
    crate::store::write_json(&out.join("stats.json"), &st)?;
    Ok(st)
}

/// Loads a trained pair written by [`run_stegastamp_step`].
pub fn load(dir: &Path, device: &Device) -> Result<(StegaStamp, StegaParams)> {
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let p: StegaParams = serde_json::from_str(&text)?;
    let m = crate::models::load_safetensors(
        StegaStamp::new(&p, device),
        &dir.join("model.safetensors"),
        device,
    )?;
    Ok((m, p))
}
