//! The robust model f_r's architecture (paper Section 4.3, Table 8): one of the ViT (the
//! default), DeiT-S, CaiT-XXS, PiT-XS, XCiT-Tiny, ResNet-18 or VGG-11, chosen by name in a spec (`model:`).
//! f_p is always the first block(s) of the ViT checkpoint.
//!
//! Sizes follow the scale's `model:` dimensions (the ViT's): at the `paper` scale
//! (dim 384, depth 12, heads 6) every architecture has its published size; smaller scales
//! shrink them proportionally (see [`NetConfig`]). Checkpoints hold the inner model's
//! parameters under the same names as a standalone model of that architecture, and
//! `config.json` records the architecture as `arch` (left out for the ViT, so ViT checkpoints
//! are unchanged).

use std::path::Path;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::cait::Cait;
use super::deit::Deit;
use super::pit::Pit;
use super::resnet::ResNet;
use super::vgg::Vgg;
use super::vit::{Init, Vit, VitConfig};
use super::xcit::Xcit;

/// An architecture of f_r, by its spec name.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Arch {
    /// ViT-S with the SiT head (the paper's default).
    #[default]
    #[serde(rename = "vit")]
    Vit,
    /// DeiT-III small with LayerScale (`deit_small_patch16_LS`).
    #[serde(rename = "deit")]
    Deit,
    /// CaiT-XXS-24: LayerScale, talking-heads attention, class-attention blocks.
    #[serde(rename = "cait")]
    Cait,
    /// PiT-XS: pooling stages.
    #[serde(rename = "pit")]
    Pit,
    /// XCiT-Tiny-12: cross-covariance attention.
    #[serde(rename = "xcit")]
    Xcit,
    /// ResNet-18.
    #[serde(rename = "resnet18")]
    Resnet18,
    /// VGG-11 (configuration A) with BatchNorm.
    #[serde(rename = "vgg11")]
    Vgg11,
}

/// Every architecture with its spec name.
pub const ARCHS: &[(Arch, &str)] = &[
    (Arch::Vit, "vit"),
    (Arch::Deit, "deit"),
    (Arch::Cait, "cait"),
    (Arch::Pit, "pit"),
    (Arch::Xcit, "xcit"),
    (Arch::Resnet18, "resnet18"),
    (Arch::Vgg11, "vgg11"),
];

impl Arch {
    pub fn is_vit(&self) -> bool {
        *self == Arch::Vit
    }

    pub fn name(self) -> &'static str {
        ARCHS.iter().find(|(a, _)| *a == self).unwrap().1
    }

    /// Whether this architecture can be built at an image and patch size.
    pub fn check(self, image_size: usize, patch_size: usize) -> Result<(), String> {
        match self {
            Arch::Xcit if !patch_size.is_power_of_two() || patch_size < 2 => Err(format!(
                "xcit embeds patches with stride-2 convolutions: patch size {patch_size} must be a power of two"
            )),
            Arch::Pit if patch_size < 2 || patch_size > image_size => Err(format!(
                "pit needs a patch size in 2..={image_size}, not {patch_size}"
            )),
            _ => Ok(()),
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        ARCHS
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(a, _)| *a)
            .ok_or_else(|| {
                let known: Vec<&str> = ARCHS.iter().map(|(_, n)| *n).collect();
                format!("unknown model '{name}' (known: {})", known.join(", "))
            })
    }
}

/// An architecture and the ViT dimensions it is sized from; stored as `config.json`
/// (the ViT's fields, plus `arch` when it is not the ViT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Arch::is_vit")]
    pub arch: Arch,
    #[serde(flatten)]
    pub vit: VitConfig,
}

impl NetConfig {
    pub fn new(arch: Arch, vit: VitConfig) -> Self {
        Self { arch, vit }
    }

    /// A width scaled from its `paper`-size value by dim/384 (at least 4).
    pub fn width(&self, paper: usize) -> usize {
        (paper * self.vit.dim / 384).max(4)
    }
}

/// The classifier interface every architecture provides.
pub trait Classifier: Module + Sync {
    /// Normalised images [B, 3, H, W] → logits [B, C].
    fn forward(&self, x: Tensor<4>) -> Tensor<2>;
    /// Whether, in training mode, each image's logits depend on that image alone (false
    /// for batch normalisation), so a learning step may split its batch into shards.
    fn per_image(&self) -> bool {
        true
    }
}

impl Classifier for Vit {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        Vit::forward(self, x)
    }
}

/// f_r of any architecture.
#[derive(Module, Debug)]
pub enum Net {
    Vit(Vit),
    Deit(Deit),
    Cait(Cait),
    Pit(Pit),
    Xcit(Xcit),
    Resnet(ResNet),
    Vgg(Vgg),
}

impl Classifier for Net {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        Net::forward(self, x)
    }
    /// ResNet, VGG and XCiT's convolutional patch embedding use batch normalisation.
    fn per_image(&self) -> bool {
        !matches!(self, Net::Resnet(_) | Net::Vgg(_) | Net::Xcit(_))
    }
}

impl Net {
    /// A freshly initialised model; the same seed always gives the same weights.
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        match cfg.arch {
            Arch::Vit => Net::Vit(Vit::new(&cfg.vit, seed, device)),
            Arch::Deit => Net::Deit(Deit::new(cfg, seed, device)),
            Arch::Cait => Net::Cait(Cait::new(cfg, seed, device)),
            Arch::Pit => Net::Pit(Pit::new(cfg, seed, device)),
            Arch::Xcit => Net::Xcit(Xcit::new(cfg, seed, device)),
            Arch::Resnet18 => Net::Resnet(ResNet::new(cfg, seed, device)),
            Arch::Vgg11 => Net::Vgg(Vgg::new(cfg, seed, device)),
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            Net::Vit(_) => Arch::Vit,
            Net::Deit(_) => Arch::Deit,
            Net::Cait(_) => Arch::Cait,
            Net::Pit(_) => Arch::Pit,
            Net::Xcit(_) => Arch::Xcit,
            Net::Resnet(_) => Arch::Resnet18,
            Net::Vgg(_) => Arch::Vgg11,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Net::Vit(m) => m.forward(x),
            Net::Deit(m) => m.forward(x),
            Net::Cait(m) => m.forward(x),
            Net::Pit(m) => m.forward(x),
            Net::Xcit(m) => m.forward(x),
            Net::Resnet(m) => m.forward(x),
            Net::Vgg(m) => m.forward(x),
        }
    }

    /// The same body with a fresh classification head.
    pub fn with_new_head(self, num_classes: usize, seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed, device);
        match self {
            Net::Vit(m) => Net::Vit(m.with_new_head(num_classes, seed, device)),
            Net::Deit(m) => Net::Deit(m.with_new_head(num_classes, &mut init)),
            Net::Cait(m) => Net::Cait(m.with_new_head(num_classes, &mut init)),
            Net::Pit(m) => Net::Pit(m.with_new_head(num_classes, &mut init)),
            Net::Xcit(m) => Net::Xcit(m.with_new_head(num_classes, &mut init)),
            Net::Resnet(m) => Net::Resnet(m.with_new_head(num_classes, &mut init)),
            Net::Vgg(m) => Net::Vgg(m.with_new_head(num_classes, &mut init)),
        }
    }

    /// The ViT inside, for the defences that run on the ViT only.
    pub fn into_vit(self, what: &str) -> Result<Vit> {
        match self {
            Net::Vit(v) => Ok(v),
            other => bail!(
                "{what} runs on the ViT only, not on {} (set `model: vit`)",
                other.arch().name()
            ),
        }
    }
}

/// Writes `model.safetensors` (the inner model's parameters, named as in a standalone
/// model) and `config.json`.
pub fn save_net(net: &Net, cfg: &NetConfig, dir: &Path) -> Result<()> {
    crate::store::write_json(&dir.join("config.json"), cfg)?;
    let path = dir.join("model.safetensors");
    match net {
        Net::Vit(m) => super::save_safetensors(m, &path),
        Net::Deit(m) => super::save_safetensors(m, &path),
        Net::Cait(m) => super::save_safetensors(m, &path),
        Net::Pit(m) => super::save_safetensors(m, &path),
        Net::Xcit(m) => super::save_safetensors(m, &path),
        Net::Resnet(m) => super::save_safetensors(m, &path),
        Net::Vgg(m) => super::save_safetensors(m, &path),
    }
}

/// [`save_net`] plus `train_stats.json`.
pub fn save_net_with_stats<S: Serialize>(
    net: &Net,
    cfg: &NetConfig,
    stats: &S,
    dir: &Path,
) -> Result<()> {
    save_net(net, cfg, dir)?;
    crate::store::write_json(&dir.join("train_stats.json"), stats)
}

pub fn load_net_config(dir: &Path) -> Result<NetConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Loads a model of any architecture saved by [`save_net`] (or a ViT saved by `save_vit`).
pub fn load_net(dir: &Path, device: &Device) -> Result<(Net, NetConfig)> {
    let cfg = load_net_config(dir)?;
    let path = dir.join("model.safetensors");
    let net = match Net::new(&cfg, 0, device) {
        Net::Vit(m) => Net::Vit(super::load_safetensors(m, &path, device)?),
        Net::Deit(m) => Net::Deit(super::load_safetensors(m, &path, device)?),
        Net::Cait(m) => Net::Cait(super::load_safetensors(m, &path, device)?),
        Net::Pit(m) => Net::Pit(super::load_safetensors(m, &path, device)?),
        Net::Xcit(m) => Net::Xcit(super::load_safetensors(m, &path, device)?),
        Net::Resnet(m) => Net::Resnet(super::load_safetensors(m, &path, device)?),
        Net::Vgg(m) => Net::Vgg(super::load_safetensors(m, &path, device)?),
    };
    Ok((net, cfg))
}

// ---------------------------------------------------------------------------------------
// Building blocks of the convolutional networks.

/// A k×k convolution with Kaiming-normal (fan-out, ReLU gain) weights drawn from our seeded
/// stream (truncated at ±2σ), as torchvision's ResNet/VGG init.
pub fn conv(
    init: &mut Init,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    bias: bool,
) -> Conv2d {
    let fan_out = (c_out * k * k / groups).max(1);
    Conv2d {
        weight: init.normal([c_out, c_in / groups, k, k], (2.0 / fan_out as f32).sqrt()),
        bias: bias.then(|| init.zeros([c_out])),
        stride: [stride, stride],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups,
        padding: PaddingConfig2d::Explicit(pad, pad, pad, pad),
    }
}

/// BatchNorm (γ = 1, β = 0, running mean 0 and variance 1; torch's eps and momentum).
/// It normalises with the batch statistics (and updates the running ones) when its input is
/// on an autodiff device, and with the running statistics otherwise, so training runs on
/// `device.autodiff()` and evaluation on `model.valid()`.
pub fn batch_norm(init: &Init, channels: usize) -> BatchNorm {
    BatchNormConfig::new(channels).init(init.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{
        LossKind, Supervised, View, cosine_schedule, iters_per_epoch, train_supervised,
    };

    fn cfg(arch: Arch) -> NetConfig {
        NetConfig::new(
            arch,
            VitConfig {
                image_size: 16,
                patch_size: 4,
                dim: 32,
                depth: 2,
                heads: 2,
                mlp_ratio: 2,
                num_classes: 5,
            },
        )
    }

    fn images(device: &Device, b: usize) -> Tensor<4> {
        let vals: Vec<f32> = (0..b * 3 * 16 * 16)
            .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(vals, [b, 3, 16, 16]), device)
    }

    fn logits(net: &Net, x: Tensor<4>) -> Vec<f32> {
        net.forward(x)
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap()
    }

    #[test]
    fn every_architecture_has_the_right_shape_and_is_seeded() {
        let device = Device::flex();
        for &(arch, name) in ARCHS {
            let c = cfg(arch);
            let a = Net::new(&c, 3, &device);
            assert_eq!(a.arch(), arch);
            assert_eq!(Arch::parse(name), Ok(arch));
            let out = a.forward(images(&device, 2));
            assert_eq!(out.dims(), [2, 5], "{name}");
            let pa = crate::models::named_params(&a);
            assert_eq!(
                pa,
                crate::models::named_params(&Net::new(&c, 3, &device)),
                "{name}"
            );
            assert_ne!(
                pa,
                crate::models::named_params(&Net::new(&c, 4, &device)),
                "{name}"
            );
            let h = a.with_new_head(7, 1, &device);
            assert_eq!(h.forward(images(&device, 1)).dims(), [1, 7], "{name}");
        }
        assert!(Arch::parse("wrn").unwrap_err().contains("resnet18"));
    }

    /// At the `paper` scale's dimensions every architecture has its published size
    /// (parameters, with a 10-class head; timm's counts less their 1000-class heads).
    #[test]
    fn paper_sizes_match_the_published_models() {
        let device = Device::flex();
        let paper = VitConfig {
            image_size: 224,
            patch_size: 16,
            dim: 384,
            depth: 12,
            heads: 6,
            mlp_ratio: 4,
            num_classes: 10,
        };
        for (arch, millions) in [
            (Arch::Vit, 22.0),
            (Arch::Deit, 21.7),
            (Arch::Cait, 11.8),
            (Arch::Pit, 10.2),
            (Arch::Xcit, 6.5),
            (Arch::Resnet18, 11.2),
            (Arch::Vgg11, 9.2),
        ] {
            let net = Net::new(&NetConfig::new(arch, paper.clone()), 0, &device);
            let n: usize = crate::models::named_params(&net)
                .values()
                .map(|(shape, _)| shape.iter().product::<usize>())
                .sum();
            let m = n as f64 / 1e6;
            eprintln!("{arch:?}: {m:.2}M parameters");
            assert!(
                (m - millions).abs() < 0.1 * millions,
                "{arch:?}: {m:.2}M parameters, expected about {millions}M"
            );
        }
    }

    #[test]
    fn save_load_round_trip_gives_identical_logits() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        for &(arch, name) in ARCHS {
            let c = cfg(arch);
            // One training-mode forward pass moves the BatchNorm running statistics away
            // from their initial values, so the round trip must carry them.
            let net = Net::new(&c, 9, &ad);
            let _ = net.forward(images(&ad, 4));
            let net = net.valid();
            let dir = tempfile::tempdir().unwrap();
            save_net(&net, &c, dir.path()).unwrap();
            let (back, c2) = load_net(dir.path(), &device).unwrap();
            assert_eq!(c2, c);
            assert_eq!(
                logits(&net, images(&device, 3)),
                logits(&back, images(&device, 3)),
                "{name}"
            );
            let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
            assert_eq!(text.contains("\"arch\""), !arch.is_vit(), "{name}");
        }
    }

    #[test]
    fn batch_norm_uses_batch_statistics_in_training_and_running_ones_in_evaluation() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        for arch in [Arch::Resnet18, Arch::Vgg11, Arch::Xcit] {
            let net = Net::new(&cfg(arch), 1, &ad);
            let x = images(&ad, 4);
            let train_a = logits(&net, x.clone());
            // The running statistics moved, so a second training pass of the same batch
            // gives the same output (batch statistics) but evaluation differs.
            let train_b = logits(&net, x.clone());
            assert_eq!(train_a, train_b);
            let eval = net.valid();
            let e = logits(&eval, images(&device, 4));
            assert_ne!(train_a, e, "{arch:?}");
            // Evaluation is per image: a batch of one gives the same logits as in a batch.
            let one: Tensor<4> = images(&device, 4).slice([0..1]);
            let e1 = logits(&eval, one);
            for (a, b) in e1.iter().zip(&e[..5]) {
                assert!((a - b).abs() < 1e-4, "{arch:?}: {e1:?} vs {:?}", &e[..5]);
            }
        }
    }

    #[test]
    fn a_few_training_steps_reduce_the_loss_of_every_architecture() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        // Fitting one batch of 16 images: every architecture must reduce its loss.
        let raw = crate::data::synthetic::generate(1, 16, 16, 16);
        let meta = crate::data::DatasetMeta {
            name: "synthetic".into(),
            classes: raw.classes.clone(),
            image_size: 16,
            mean: raw.mean,
            std: raw.std,
            pretrain: 16,
            tune: 0,
            test: 16,
        };
        for &(arch, name) in ARCHS {
            let mut c = cfg(arch);
            c.vit.num_classes = 10;
            let net = Net::new(&c, 2, &ad);
            let epochs = 40;
            let iters = iters_per_epoch(16, 16);
            let lr = cosine_schedule(3e-3, 3e-3, epochs, iters, 0, 0.0);
            let wd = vec![0.0; lr.len()];
            let sup = Supervised {
                label: "test",
                epochs,
                batch_size: 16,
                views: &[View::NoAug],
                lr,
                wd,
                seed: 2,
                keep_last: false,
            };
            let (_, log) =
                train_supervised(net, &raw.train, &meta, &sup, LossKind::Ce, &ad).unwrap();
            assert!(
                log.last().unwrap() < &(log[0] * 0.9),
                "{name}: loss did not fall: {log:?}"
            );
        }
    }
}
