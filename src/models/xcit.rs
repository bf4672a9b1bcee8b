//! XCiT-Tiny-12 (El-Nouby et al., 2021, "XCiT: Cross-Covariance Image Transformers"):
//! - a convolutional patch embedding (log₂ p stride-2 3×3 convolutions with BatchNorm and
//!   GELU between them) and position embeddings (learned here; the paper uses Fourier
//!   features with a 1×1 projection);
//! - XCA blocks: cross-covariance attention — attention over channels, d_h×d_h per head,
//!   with q and k L2-normalised along the tokens and a learned per-head temperature; local
//!   patch interaction (depthwise 3×3 conv, GELU, BatchNorm, depthwise 3×3 conv on the token
//!   map); an MLP; every branch scaled by LayerScale (η = 1.0 for Tiny-12);
//! - two class-attention layers at the end (the CaiT ones: only the CLS token queries and is
//!   updated), final norm, head on the CLS token.
//!
//! At `paper`: 192 wide, 12 blocks, 4 heads. Below it: width dim/2 (a multiple of 4), the
//! scale's depth, 4 heads.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, LayerNorm, Linear};
use burn::prelude::*;

use super::cait::CaBlock;
use super::fused::{gelu, layer_norm, softmax_last};
use super::net::{NetConfig, batch_norm, conv};
use super::vit::{Init, LN_EPS, Mlp};

pub const XCIT_HEADS: usize = 4;
/// LayerScale initial value η of XCiT-Tiny-12.
pub const XCIT_ETA: f32 = 1.0;

#[derive(Module, Debug)]
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

#[derive(Module, Debug)]
pub struct Xca {
    pub qkv: Linear,
    pub proj: Linear,
    /// Per-head temperature τ [H].
    pub temperature: Param<Tensor<1>>,
    heads: usize,
}

/// x / max(‖x‖₂, 1e-12) along `dim`.
fn l2_normalise(x: Tensor<4>, dim: usize) -> Tensor<4> {
    let n = x
        .clone()
        .powi_scalar(2)
        .sum_dim(dim)
        .sqrt()
        .clamp_min(1e-12);
    x / n
}

impl Xca {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let h = self.heads;
        let hd = d / h;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, h, hd])
            .permute([2, 0, 3, 4, 1]); // [3, B, H, hd, N]
        let q: Tensor<4> = qkv.clone().slice([0..1]).reshape([b, h, hd, n]);
        let k: Tensor<4> = qkv.clone().slice([1..2]).reshape([b, h, hd, n]);
        let v: Tensor<4> = qkv.slice([2..3]).reshape([b, h, hd, n]);
        let (q, k) = (l2_normalise(q, 3), l2_normalise(k, 3));
        let t = self.temperature.val().reshape([1, h, 1, 1]);
        let attn = softmax_last(q.matmul(k.swap_dims(2, 3)) * t); // [B, H, hd, hd]
        let out = attn.matmul(v).permute([0, 3, 1, 2]).reshape([b, n, d]);
        self.proj.forward(out)
    }
}

/// Local patch interaction on the token map.
#[derive(Module, Debug)]
pub struct Lpi {
    pub conv1: Conv2d,
    pub bn: BatchNorm,
    pub conv2: Conv2d,
}

#[derive(Module, Debug)]
pub struct XcaBlock {
    pub norm1: LayerNorm,
    pub attn: Xca,
    pub gamma1: Param<Tensor<1>>,
    pub norm3: LayerNorm,
    pub local_mp: Lpi,
    pub gamma3: Param<Tensor<1>>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub gamma2: Param<Tensor<1>>,
}

fn ls(g: &Param<Tensor<1>>) -> Tensor<3> {
    let d = g.val().dims()[0];
    g.val().reshape([1, 1, d])
}

impl XcaBlock {
    fn forward(&self, x: Tensor<3>, side: usize) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let x =
            x.clone() + self.attn.forward(layer_norm(&self.norm1, x, LN_EPS)) * ls(&self.gamma1);
        let map = layer_norm(&self.norm3, x.clone(), LN_EPS)
            .swap_dims(1, 2)
            .reshape([b, d, side, side]);
        let l = &self.local_mp;
        let map = l.conv2.forward(l.bn.forward(gelu(l.conv1.forward(map))));
        let local = map.reshape([b, d, n]).swap_dims(1, 2);
        let x = x + local * ls(&self.gamma3);
        x.clone() + self.mlp.forward(layer_norm(&self.norm2, x, LN_EPS)) * ls(&self.gamma2)
    }
}

#[derive(Module, Debug)]
pub struct Xcit {
    pub patch_embed: Vec<ConvBnAct>,
    pub pos_embed: Param<Tensor<3>>,
    pub cls_token: Param<Tensor<3>>,
    pub blocks: Vec<XcaBlock>,
    pub cls_attn_blocks: Vec<CaBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    side: usize,
}

impl Xcit {
    pub fn dim(cfg: &NetConfig) -> usize {
        ((cfg.vit.dim / 2) / XCIT_HEADS).max(1) * XCIT_HEADS
    }

    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let c = &cfg.vit;
        let dim = Self::dim(cfg);
        let mut init = Init::new(seed ^ 0x8C17, device);
        // log2(p) stride-2 convolutions: 3 → dim/2^(n−1) → … → dim.
        let n = c.patch_size.max(2).ilog2() as usize;
        let mut c_in = 3;
        let patch_embed = (0..n)
            .map(|i| {
                let c_out = (dim >> (n - 1 - i)).max(1);
                let layer = ConvBnAct {
                    conv: conv(&mut init, c_in, c_out, 3, 2, 1, 1, false),
                    bn: batch_norm(&init, c_out),
                };
                c_in = c_out;
                layer
            })
            .collect();
        let side = c.image_size >> n;
        let blocks = (0..c.depth)
            .map(|_| XcaBlock {
                norm1: init.layer_norm(dim),
                attn: Xca {
                    qkv: init.linear(dim, 3 * dim),
                    proj: init.linear(dim, dim),
                    temperature: init.constant([XCIT_HEADS], 1.0),
                    heads: XCIT_HEADS,
                },
                gamma1: init.constant([dim], XCIT_ETA),
                norm3: init.layer_norm(dim),
                local_mp: Lpi {
                    conv1: conv(&mut init, dim, dim, 3, 1, 1, dim, true),
                    bn: batch_norm(&init, dim),
                    conv2: conv(&mut init, dim, dim, 3, 1, 1, dim, true),
                },
                gamma3: init.constant([dim], XCIT_ETA),
                norm2: init.layer_norm(dim),
                mlp: Mlp::new(dim, dim * c.mlp_ratio, &mut init),
                gamma2: init.constant([dim], XCIT_ETA),
            })
            .collect();
        let cls_attn_blocks = (0..2)
            .map(|_| CaBlock::new(dim, XCIT_HEADS, dim * c.mlp_ratio, XCIT_ETA, &mut init))
            .collect();
        Self {
            patch_embed,
            pos_embed: init.normal([1, side * side, dim], 0.02),
            cls_token: init.normal([1, 1, dim], 0.02),
            blocks,
            cls_attn_blocks,
            norm: init.layer_norm(dim),
            head: init.linear(dim, c.num_classes),
            side,
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
        let mut map = x;
        let last = self.patch_embed.len() - 1;
        for (i, l) in self.patch_embed.iter().enumerate() {
            map = l.bn.forward(l.conv.forward(map));
            if i < last {
                map = gelu(map);
            }
        }
        let [b, d, h, w] = map.dims();
        let mut t = map.reshape([b, d, h * w]).swap_dims(1, 2) + self.pos_embed.val();
        for blk in &self.blocks {
            t = blk.forward(t, self.side);
        }
        let mut cls = self.cls_token.val().expand([b, 1, d]);
        for blk in &self.cls_attn_blocks {
            cls = blk.forward(cls, t.clone());
        }
        self.head
            .forward(layer_norm(&self.norm, cls, LN_EPS).reshape([b, d]))
    }
}
