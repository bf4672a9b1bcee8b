//! DeiT-S as the reference loads it: `deit_small_patch16_LS`, DeiT III (Touvron et al.,
//! 2022) — a ViT with LayerScale. Every residual branch is scaled per channel by a learned
//! γ initialised to 10⁻⁴ (DeiT III's `init_scale` for this model); position embeddings are
//! added to the patch tokens before the CLS token is prepended; the head reads the final
//! CLS token. Same widths as the scale's ViT (384 wide, 12 blocks, 6 heads at `paper`).

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use super::fused::layer_norm;
use super::net::NetConfig;
use super::vit::{Attention, Init, LN_EPS, Mlp, patchify};

/// DeiT III's LayerScale initial value for the small LS model.
pub const DEIT_LS_INIT: f32 = 1e-4;

#[derive(Module, Debug)]
pub struct LsBlock {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub gamma_1: Param<Tensor<1>>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub gamma_2: Param<Tensor<1>>,
}

impl LsBlock {
    pub fn new(dim: usize, heads: usize, mlp_ratio: usize, ls: f32, init: &mut Init) -> Self {
        Self {
            norm1: init.layer_norm(dim),
            attn: Attention::new(dim, heads, init),
            gamma_1: init.constant([dim], ls),
            norm2: init.layer_norm(dim),
            mlp: Mlp::new(dim, dim * mlp_ratio, init),
            gamma_2: init.constant([dim], ls),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let g1 = self.gamma_1.val().reshape([1, 1, d]);
        let g2 = self.gamma_2.val().reshape([1, 1, d]);
        let x = x.clone() + self.attn.forward(layer_norm(&self.norm1, x, LN_EPS)) * g1;
        x.clone() + self.mlp.forward(layer_norm(&self.norm2, x, LN_EPS)) * g2
    }
}

#[derive(Module, Debug)]
pub struct Deit {
    pub patch_embed: Linear,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<LsBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    patch_size: usize,
}

impl Deit {
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let c = &cfg.vit;
        let mut init = Init::new(seed ^ 0xDE17, device);
        Self {
            patch_embed: init.linear(c.patch_dim(), c.dim),
            cls_token: init.normal([1, 1, c.dim], 0.02),
            pos_embed: init.normal([1, c.num_patches(), c.dim], 0.02),
            blocks: (0..c.depth)
                .map(|_| LsBlock::new(c.dim, c.heads, c.mlp_ratio, DEIT_LS_INIT, &mut init))
                .collect(),
            norm: init.layer_norm(c.dim),
            head: init.linear(c.dim, c.num_classes),
            patch_size: c.patch_size,
        }
    }

    pub fn with_new_head(self, num_classes: usize, init: &mut Init) -> Self {
        let d = self.head.weight.val().dims()[0];
        Self {
            head: init.linear(d, num_classes),
            ..self
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let b = x.dims()[0];
        let tokens = self.patch_embed.forward(patchify(x, self.patch_size)) + self.pos_embed.val();
        let d = tokens.dims()[2];
        let mut h = Tensor::cat(vec![self.cls_token.val().expand([b, 1, d]), tokens], 1);
        for blk in &self.blocks {
            h = blk.forward(h);
        }
        let h = layer_norm(&self.norm, h, LN_EPS);
        self.head.forward(h.slice([0..b, 0..1]).reshape([b, d]))
    }
}
