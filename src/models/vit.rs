//! Vision Transformer (Dosovitskiy et al., 2021) in the layout of the paper's ViT-S
//! (reference notes §3.1): patch embedding, a CLS token and learned position embeddings,
//! pre-norm blocks (LayerNorm eps 1e-6, fused qkv with bias, GELU MLP), a final LayerNorm,
//! and the SiT-style head: [CLS, mean of patch tokens] → Linear(2d→d) → GELU → Linear(d→C).
//! Linear weights and embeddings are initialised N(0, 0.02²), biases 0.
//!
//! The poisoned module f_p is the same model truncated to its first k blocks, with a fresh
//! head ([`Vit::truncated`]).

use super::fused::{gelu, layer_norm, softmax_last};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Architecture of a ViT; stored beside every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub num_classes: usize,
}

impl VitConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    pub fn patch_dim(&self) -> usize {
        3 * self.patch_size * self.patch_size
    }
}

pub const LN_EPS: f64 = 1e-6;

/// Seeded parameter initialisation. Values are drawn from our own ChaCha stream, not the
/// backend's global RNG, so a model is a pure function of its seed whatever else runs
/// concurrently.
pub struct Init {
    rng: ChaCha8Rng,
    device: Device,
}

impl Init {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x1417),
            device: device.clone(),
        }
    }

    /// N(0, std²) truncated at ±2 std (timm's trunc_normal_).
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], std: f32) -> Param<Tensor<D>> {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                loop {
                    let z = crate::data::augment::gaussian(&mut self.rng);
                    if z.abs() <= 2.0 {
                        break z * std;
                    }
                }
            })
            .collect();
        Param::from_data(TensorData::new(vals, shape), &self.device)
    }

    pub fn zeros<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<D>> {
        let n: usize = shape.iter().product();
        Param::from_data(TensorData::new(vec![0f32; n], shape), &self.device)
    }

    pub fn linear(&mut self, d_in: usize, d_out: usize) -> Linear {
        Linear {
            weight: self.normal([d_in, d_out], 0.02),
            bias: Some(self.zeros([d_out])),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A constant-filled parameter (LayerScale's γ).
    pub fn constant<const D: usize>(&mut self, shape: [usize; D], value: f32) -> Param<Tensor<D>> {
        let n: usize = shape.iter().product();
        Param::from_data(TensorData::new(vec![value; n], shape), &self.device)
    }

    pub fn layer_norm(&mut self, dim: usize) -> LayerNorm {
        LayerNormConfig::new(dim)
            .with_epsilon(LN_EPS)
            .init(&self.device)
    }
}

/// Images [B, C, H, W] → non-overlapping p×p patches [B, N, C·p·p] (row-major patch
/// order, channel-major within a patch, as a stride-p convolution's weight).
pub fn patchify(x: Tensor<4>, p: usize) -> Tensor<3> {
    let [b, c, h, w] = x.dims();
    let (gh, gw) = (h / p, w / p);
    x.reshape([b * c * gh, p, gw, p])
        .swap_dims(1, 2) // [b·c·gh, gw, p, p]
        .reshape([b, c, gh * gw, p * p])
        .swap_dims(1, 2) // [b, N, c, p·p]
        .reshape([b, gh * gw, c * p * p])
}

#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(dim: usize, heads: usize, init: &mut Init) -> Self {
        Self {
            qkv: init.linear(dim, 3 * dim),
            proj: init.linear(dim, dim),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_probed(x, None)
    }

    /// The forward pass with the attention weights A [B, H, N, N] multiplied by `probe`.
    /// A probe of ones that requires grad leaves the output unchanged and receives the
    /// gradient A ⊙ ∂L/∂A, which is what GradRollout fuses (see `defences::attnblock`).
    pub fn forward_probed(&self, x: Tensor<3>, probe: Option<Tensor<4>>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let hd = d / self.heads;
        let qkv = self.qkv.forward(x);
        if probe.is_none()
            && let Some(out) = super::fused_attention::self_attention(&qkv, self.heads)
        {
            return self.proj.forward(out);
        }
        // Burn's ops: [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = qkv
            .reshape([b, n, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let q: Tensor<4> = qkv.clone().slice([0..1]).reshape([b, self.heads, n, hd]);
        let k: Tensor<4> = qkv.clone().slice([1..2]).reshape([b, self.heads, n, hd]);
        let v: Tensor<4> = qkv.slice([2..3]).reshape([b, self.heads, n, hd]);
        // q is scaled before the product, as timm's attention does: one pass over
        // [B, H, N, hd] instead of over the [B, H, N, N] logits.
        let scale = (hd as f64).powf(-0.5);
        let mut attn = softmax_last(q.mul_scalar(scale).matmul(k.swap_dims(2, 3)));
        if let Some(m) = probe {
            attn = attn * m;
        }
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, n, d]);
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, init: &mut Init) -> Self {
        Self {
            fc1: init.linear(dim, hidden),
            fc2: init.linear(hidden, dim),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn new(dim: usize, heads: usize, mlp_ratio: usize, init: &mut Init) -> Self {
        Self {
            norm1: init.layer_norm(dim),
            attn: Attention {
                qkv: init.linear(dim, 3 * dim),
                proj: init.linear(dim, dim),
                heads,
            },
            norm2: init.layer_norm(dim),
            mlp: Mlp {
                fc1: init.linear(dim, dim * mlp_ratio),
                fc2: init.linear(dim * mlp_ratio, dim),
            },
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_probed(x, None)
    }

    pub fn forward_probed(&self, x: Tensor<3>, probe: Option<Tensor<4>>) -> Tensor<3> {
        let x = x.clone()
            + self
                .attn
                .forward_probed(layer_norm(&self.norm1, x, LN_EPS), probe);
        let h = self.mlp.fc2.forward(gelu(self.mlp.fc1.forward(layer_norm(
            &self.norm2,
            x.clone(),
            LN_EPS,
        ))));
        x + h
    }
}

/// SiT head over [CLS, mean patch token].
#[derive(Module, Debug)]
pub struct Head {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Head {
    fn new(dim: usize, classes: usize, init: &mut Init) -> Self {
        Self {
            fc1: init.linear(2 * dim, dim),
            fc2: init.linear(dim, classes),
        }
    }
}

#[derive(Module, Debug)]
pub struct Vit {
    /// Patch projection: a linear map of flattened (c, py, px) patches, equivalent to
    /// timm's stride-p convolution.
    pub patch_embed: Linear,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Head,
    patch_size: usize,
}

impl Vit {
    /// A freshly initialised ViT; the same seed always gives the same weights.
    pub fn new(cfg: &VitConfig, seed: u64, device: &Device) -> Self {
        let n = cfg.num_patches();
        let mut init = Init::new(seed, device);
        Self {
            patch_embed: init.linear(cfg.patch_dim(), cfg.dim),
            cls_token: init.normal([1, 1, cfg.dim], 0.02),
            pos_embed: init.normal([1, n + 1, cfg.dim], 0.02),
            blocks: (0..cfg.depth)
                .map(|_| Block::new(cfg.dim, cfg.heads, cfg.mlp_ratio, &mut init))
                .collect(),
            norm: init.layer_norm(cfg.dim),
            head: Head::new(cfg.dim, cfg.num_classes, &mut init),
            patch_size: cfg.patch_size,
        }
    }

    /// The first `depth` blocks of this model with a freshly initialised head for
    /// `num_classes` classes (the paper's f_p when applied to the pretrained checkpoint).
    pub fn truncated(&self, depth: usize, num_classes: usize, seed: u64, device: &Device) -> Self {
        let dim = self.norm.gamma.val().dims()[0];
        Self {
            patch_embed: self.patch_embed.clone(),
            cls_token: self.cls_token.clone(),
            pos_embed: self.pos_embed.clone(),
            blocks: self.blocks[..depth.min(self.blocks.len())].to_vec(),
            norm: self.norm.clone(),
            head: Head::new(dim, num_classes, &mut Init::new(seed, device)),
            patch_size: self.patch_size,
        }
    }

    /// The same backbone with a fresh head (finetuning starts from the checkpoint's body).
    pub fn with_new_head(self, num_classes: usize, seed: u64, device: &Device) -> Self {
        let dim = self.norm.gamma.val().dims()[0];
        Self {
            head: Head::new(dim, num_classes, &mut Init::new(seed, device)),
            ..self
        }
    }

    /// Images [B, 3, H, W] (normalised) → patch tokens [B, N, 3·p·p].
    fn patchify(&self, x: Tensor<4>) -> Tensor<3> {
        patchify(x, self.patch_size)
    }

    /// Token features after the final norm: [B, N+1, d].
    pub fn features(&self, x: Tensor<4>) -> Tensor<3> {
        self.features_probed(x, &[])
    }

    /// [`Vit::features`] with one attention probe per block (or none: `&[]`).
    pub fn features_probed(&self, x: Tensor<4>, probes: &[Tensor<4>]) -> Tensor<3> {
        let b = x.dims()[0];
        let tokens = self.patch_embed.forward(self.patchify(x));
        let d = tokens.dims()[2];
        let cls = self.cls_token.val().expand([b, 1, d]);
        let mut h = Tensor::cat(vec![cls, tokens], 1) + self.pos_embed.val();
        for (i, blk) in self.blocks.iter().enumerate() {
            h = blk.forward_probed(h, probes.get(i).cloned());
        }
        layer_norm(&self.norm, h, LN_EPS)
    }

    /// Logits [B, C].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_probed(x, &[])
    }

    /// Logits with attention probes (see [`Attention::forward_probed`]).
    pub fn forward_probed(&self, x: Tensor<4>, probes: &[Tensor<4>]) -> Tensor<2> {
        let h = self.features_probed(x, probes);
        let [b, n1, d] = h.dims();
        let cls: Tensor<2> = h.clone().slice([0..b, 0..1]).reshape([b, d]);
        let mean: Tensor<2> = h.slice([0..b, 1..n1]).mean_dim(1).reshape([b, d]);
        let z = Tensor::cat(vec![cls, mean], 1);
        self.head.fc2.forward(gelu(self.head.fc1.forward(z)))
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    pub fn heads(&self) -> usize {
        self.blocks.first().map(|b| b.attn.heads).unwrap_or(1)
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_matches_channel_major_patch_flattening() {
        let device = Device::flex();
        let cfg = VitConfig {
            image_size: 4,
            patch_size: 2,
            dim: 8,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 3,
        };
        let vit = Vit::new(&cfg, 0, &device);
        let vals: Vec<f32> = (0..2 * 3 * 16).map(|i| i as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(vals.clone(), [2, 3, 4, 4]), &device);
        let p: Vec<f32> = vit.patchify(x).to_data().try_to_vec().unwrap();
        // Patch 1 (row 0, col 1) of image 1, channel 2, pixel (1, 0) -> input index
        // img1: 48 + c2: 32 + y1: 4 + x (2+0) = 86
        let patch = 1;
        let off = (4 + patch) * 12 + 2 * 4 + 2;
        assert_eq!(p[off], 86.0);
        let logits = vit.forward(Tensor::<4>::from_data(
            TensorData::new(vals, [2, 3, 4, 4]),
            &device,
        ));
        assert_eq!(logits.dims(), [2, 3]);
        let f_p = vit.truncated(1, 5, 0, &device);
        assert_eq!(f_p.depth(), 1);
    }
}
