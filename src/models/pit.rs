//! PiT-XS (Heo et al., 2021, "Rethinking spatial dimensions of vision transformers"):
//! an overlapping convolutional patch embedding (kernel p, stride p/2) with a learned 2-D
//! position embedding, then three transformer stages of [2, 6, 4] blocks. Between stages the
//! tokens are reshaped to their 2-D map and pooled by a depthwise 3×3 stride-2 convolution
//! that doubles the width and halves the resolution; the CLS token is carried through a
//! linear layer of the same widths. Final norm and a linear head on the CLS token.
//!
//! At `paper`: widths [96, 192, 384], heads [2, 4, 8], patch 16 stride 8. Below it: widths
//! [w, 2w, 4w] with w = dim/4 (even), the same heads and depths.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use super::fused::layer_norm;
use super::net::{NetConfig, conv};
use super::vit::{Block, Init, LN_EPS};

pub const PIT_DEPTHS: [usize; 3] = [2, 6, 4];
pub const PIT_HEADS: [usize; 3] = [2, 4, 8];

/// Depthwise strided pooling of the token map, and the CLS token's linear map.
#[derive(Module, Debug)]
pub struct ConvHeadPooling {
    pub conv: Conv2d,
    pub fc: Linear,
}

#[derive(Module, Debug)]
pub struct Stage {
    pub blocks: Vec<Block>,
    /// The pooling after this stage (none after the last).
    pub pool: Option<ConvHeadPooling>,
}

#[derive(Module, Debug)]
pub struct Pit {
    pub patch_embed: Conv2d,
    pub pos_embed: Param<Tensor<4>>,
    pub cls_token: Param<Tensor<3>>,
    pub stages: Vec<Stage>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl Pit {
    /// Widths of the three stages.
    pub fn widths(cfg: &NetConfig) -> [usize; 3] {
        let w = ((cfg.vit.dim / 4) / 2).max(1) * 2;
        [w, 2 * w, 4 * w]
    }

    /// Side of the token map after the overlapping patch embedding.
    fn grid(cfg: &NetConfig) -> usize {
        let p = cfg.vit.patch_size;
        let s = (p / 2).max(1);
        (cfg.vit.image_size - p) / s + 1
    }

    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let c = &cfg.vit;
        let mut init = Init::new(seed ^ 0x917, device);
        let widths = Self::widths(cfg);
        let g = Self::grid(cfg);
        let p = c.patch_size;
        let patch_embed = conv(&mut init, 3, widths[0], p, (p / 2).max(1), 0, 1, true);
        let pos_embed = init.normal([1, widths[0], g, g], 0.02);
        let cls_token = init.normal([1, 1, widths[0]], 0.02);
        let stages = (0..3)
            .map(|i| Stage {
                blocks: (0..PIT_DEPTHS[i])
                    .map(|_| Block::new(widths[i], PIT_HEADS[i], c.mlp_ratio, &mut init))
                    .collect(),
                pool: (i < 2).then(|| ConvHeadPooling {
                    conv: conv(
                        &mut init,
                        widths[i],
                        widths[i + 1],
                        3,
                        2,
                        1,
                        widths[i],
                        true,
                    ),
                    fc: init.linear(widths[i], widths[i + 1]),
                }),
            })
            .collect();
        Self {
            patch_embed,
            pos_embed,
            cls_token,
            stages,
            norm: init.layer_norm(widths[2]),
            head: init.linear(widths[2], c.num_classes),
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
        let mut map = self.patch_embed.forward(x) + self.pos_embed.val(); // [B, C, H, W]
        let [b, c0, _, _] = map.dims();
        let mut cls = self.cls_token.val().expand([b, 1, c0]);
        for stage in &self.stages {
            let [_, c, h, w] = map.dims();
            let tokens = map.reshape([b, c, h * w]).swap_dims(1, 2); // [B, HW, C]
            let mut t = Tensor::cat(vec![cls, tokens], 1);
            for blk in &stage.blocks {
                t = blk.forward(t);
            }
            let n = h * w + 1;
            cls = t.clone().slice([0..b, 0..1]);
            let tokens: Tensor<3> = t.slice([0..b, 1..n]);
            map = tokens.swap_dims(1, 2).reshape([b, c, h, w]);
            if let Some(pool) = &stage.pool {
                map = pool.conv.forward(map);
                cls = pool.fc.forward(cls);
            }
        }
        let d = cls.dims()[2];
        self.head
            .forward(layer_norm(&self.norm, cls, LN_EPS).reshape([b, d]))
    }
}
