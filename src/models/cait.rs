//! CaiT-XXS-24 (Touvron et al., 2021, "Going deeper with image transformers"):
//! - self-attention blocks over the patch tokens only, with LayerScale (γ initialised to
//!   10⁻⁵, CaiT's value for 24 layers) and talking-heads attention (learned H×H mixings of
//!   the heads before and after the softmax);
//! - the CLS token is inserted late: two class-attention blocks in which only the CLS token
//!   queries [CLS, patches] and only the CLS token is updated;
//! - final norm, head on the CLS token.
//!
//! At `paper`: 192 wide, 24 + 2 blocks, 4 heads. Below it: width dim/2 (a multiple of the 4
//! heads), 2·depth self-attention blocks, 2 class-attention blocks.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use super::fused::{layer_norm, softmax_last};
use super::net::NetConfig;
use super::vit::{Init, LN_EPS, Mlp, patchify};

/// CaiT's LayerScale initial value for depth 24.
pub const CAIT_LS_INIT: f32 = 1e-5;
pub const CAIT_HEADS: usize = 4;
pub const CLASS_ATTENTION_BLOCKS: usize = 2;

#[derive(Module, Debug)]
pub struct TalkingHeadAttention {
    pub qkv: Linear,
    /// Mixes the heads' attention logits (before the softmax).
    pub proj_l: Linear,
    /// Mixes the heads' attention weights (after the softmax).
    pub proj_w: Linear,
    pub proj: Linear,
    heads: usize,
}

impl TalkingHeadAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let h = self.heads;
        let hd = d / h;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, h, hd])
            .permute([2, 0, 3, 1, 4]);
        let q: Tensor<4> = qkv.clone().slice([0..1]).reshape([b, h, n, hd]);
        let k: Tensor<4> = qkv.clone().slice([1..2]).reshape([b, h, n, hd]);
        let v: Tensor<4> = qkv.slice([2..3]).reshape([b, h, n, hd]);
        let scale = (hd as f64).powf(-0.5);
        let attn = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)); // [B, H, N, N]
        // Heads last, mix, heads back.
        let mix =
            |l: &Linear, a: Tensor<4>| l.forward(a.permute([0, 2, 3, 1])).permute([0, 3, 1, 2]);
        let attn = softmax_last(mix(&self.proj_l, attn));
        let attn = mix(&self.proj_w, attn);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, n, d]);
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct ClassAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub proj: Linear,
    heads: usize,
}

impl ClassAttention {
    /// [CLS, patches] [B, N, d] → the CLS token's update [B, 1, d].
    fn forward(&self, u: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = u.dims();
        let h = self.heads;
        let hd = d / h;
        let cls: Tensor<3> = u.clone().slice([0..b, 0..1]);
        let q = self.q.forward(cls).reshape([b, 1, h, hd]).swap_dims(1, 2); // [B,H,1,hd]
        let k = self
            .k
            .forward(u.clone())
            .reshape([b, n, h, hd])
            .swap_dims(1, 2);
        let v = self.v.forward(u).reshape([b, n, h, hd]).swap_dims(1, 2);
        let scale = (hd as f64).powf(-0.5);
        let attn = softmax_last(q.mul_scalar(scale).matmul(k.swap_dims(2, 3))); // [B,H,1,N]
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, 1, d]);
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct SaBlock {
    pub norm1: LayerNorm,
    pub attn: TalkingHeadAttention,
    pub gamma_1: Param<Tensor<1>>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub gamma_2: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct CaBlock {
    pub norm1: LayerNorm,
    pub attn: ClassAttention,
    pub gamma_1: Param<Tensor<1>>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub gamma_2: Param<Tensor<1>>,
}

impl CaBlock {
    pub fn new(dim: usize, heads: usize, hidden: usize, ls: f32, init: &mut Init) -> Self {
        Self {
            norm1: init.layer_norm(dim),
            attn: ClassAttention {
                q: init.linear(dim, dim),
                k: init.linear(dim, dim),
                v: init.linear(dim, dim),
                proj: init.linear(dim, dim),
                heads,
            },
            gamma_1: init.constant([dim], ls),
            norm2: init.layer_norm(dim),
            mlp: Mlp::new(dim, hidden, init),
            gamma_2: init.constant([dim], ls),
        }
    }

    /// One class-attention block: the CLS token [B, 1, d] attends to [CLS, tokens] and is
    /// the only token updated.
    pub fn forward(&self, cls: Tensor<3>, tokens: Tensor<3>) -> Tensor<3> {
        let u = Tensor::cat(vec![cls.clone(), tokens], 1);
        let cls = cls + self.attn.forward(layer_norm(&self.norm1, u, LN_EPS)) * ls(&self.gamma_1);
        cls.clone() + self.mlp.forward(layer_norm(&self.norm2, cls, LN_EPS)) * ls(&self.gamma_2)
    }
}

fn ls(g: &Param<Tensor<1>>) -> Tensor<3> {
    let d = g.val().dims()[0];
    g.val().reshape([1, 1, d])
}

#[derive(Module, Debug)]
pub struct Cait {
    pub patch_embed: Linear,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<SaBlock>,
    pub blocks_token_only: Vec<CaBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    patch_size: usize,
}

impl Cait {
    /// (width, heads, self-attention blocks) for a configuration.
    pub fn dims(cfg: &NetConfig) -> (usize, usize, usize) {
        let dim = ((cfg.vit.dim / 2) / CAIT_HEADS).max(1) * CAIT_HEADS;
        (dim, CAIT_HEADS, 2 * cfg.vit.depth)
    }

    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let c = &cfg.vit;
        let (dim, heads, depth) = Self::dims(cfg);
        let hidden = dim * c.mlp_ratio;
        let mut init = Init::new(seed ^ 0xCA17, device);
        let blocks = (0..depth)
            .map(|_| SaBlock {
                norm1: init.layer_norm(dim),
                attn: TalkingHeadAttention {
                    qkv: init.linear(dim, 3 * dim),
                    proj_l: init.linear(heads, heads),
                    proj_w: init.linear(heads, heads),
                    proj: init.linear(dim, dim),
                    heads,
                },
                gamma_1: init.constant([dim], CAIT_LS_INIT),
                norm2: init.layer_norm(dim),
                mlp: Mlp::new(dim, hidden, &mut init),
                gamma_2: init.constant([dim], CAIT_LS_INIT),
            })
            .collect();
        let blocks_token_only = (0..CLASS_ATTENTION_BLOCKS)
            .map(|_| CaBlock::new(dim, heads, hidden, CAIT_LS_INIT, &mut init))
            .collect();
        Self {
            patch_embed: init.linear(c.patch_dim(), dim),
            cls_token: init.normal([1, 1, dim], 0.02),
            pos_embed: init.normal([1, c.num_patches(), dim], 0.02),
            blocks,
            blocks_token_only,
            norm: init.layer_norm(dim),
            head: init.linear(dim, c.num_classes),
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
        let mut h = self.patch_embed.forward(patchify(x, self.patch_size)) + self.pos_embed.val();
        let d = h.dims()[2];
        for blk in &self.blocks {
            h = h.clone() + blk.attn.forward(layer_norm(&blk.norm1, h, LN_EPS)) * ls(&blk.gamma_1);
            h = h.clone() + blk.mlp.forward(layer_norm(&blk.norm2, h, LN_EPS)) * ls(&blk.gamma_2);
        }
        let mut cls = self.cls_token.val().expand([b, 1, d]);
        for blk in &self.blocks_token_only {
            cls = blk.forward(cls, h.clone());
        }
        // The head reads the CLS token after the final norm (applied token-wise).
        self.head
            .forward(layer_norm(&self.norm, cls, LN_EPS).reshape([b, d]))
    }
}
