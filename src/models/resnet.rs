//! ResNet-18 (He et al., 2016): BasicBlocks (two 3×3 convolutions with BatchNorm and an
//! identity or 1×1-projection shortcut) in four stages of [2, 2, 2, 2] blocks with widths
//! w, 2w, 4w, 8w (w = 64 at the `paper` scale, scaled by dim/384 below it), global average
//! pooling and a linear head.
//!
//! Stem: the ImageNet 7×7 stride-2 convolution and 3×3 max pool for images larger than 64
//! pixels; the CIFAR-style 3×3 stride-1 convolution without pooling at 64 pixels or less
//! (the usual ResNet-18 for 32×32 images).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::net::{NetConfig, batch_norm, conv};
use super::vit::Init;

#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn new(init: &mut Init, c_in: usize, c_out: usize, stride: usize) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| Downsample {
            conv: conv(init, c_in, c_out, 1, stride, 0, 1, false),
            bn: batch_norm(init, c_out),
        });
        Self {
            conv1: conv(init, c_in, c_out, 3, stride, 1, 1, false),
            bn1: batch_norm(init, c_out),
            conv2: conv(init, c_out, c_out, 3, 1, 1, 1, false),
            bn2: batch_norm(init, c_out),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let h = self.bn2.forward(self.conv2.forward(h));
        let s = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x)),
            None => x,
        };
        relu(h + s)
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    pub stem: Conv2d,
    pub stem_bn: BatchNorm,
    pub blocks: Vec<BasicBlock>,
    pub fc: Linear,
    imagenet_stem: bool,
}

impl ResNet {
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed ^ 0x2E5, device);
        let w = cfg.width(64);
        let imagenet_stem = cfg.vit.image_size > 64;
        let stem = if imagenet_stem {
            conv(&mut init, 3, w, 7, 2, 3, 1, false)
        } else {
            conv(&mut init, 3, w, 3, 1, 1, 1, false)
        };
        let stem_bn = batch_norm(&init, w);
        let mut blocks = Vec::new();
        let mut c_in = w;
        for (stage, c_out) in [w, 2 * w, 4 * w, 8 * w].into_iter().enumerate() {
            for i in 0..2 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(&mut init, c_in, c_out, stride));
                c_in = c_out;
            }
        }
        let fc = init.linear(c_in, cfg.vit.num_classes);
        Self {
            stem,
            stem_bn,
            blocks,
            fc,
            imagenet_stem,
        }
    }

    pub fn with_new_head(self, num_classes: usize, init: &mut Init) -> Self {
        let d = self.fc.weight.val().dims()[0];
        Self {
            fc: init.linear(d, num_classes),
            ..self
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut h = relu(self.stem_bn.forward(self.stem.forward(x)));
        if self.imagenet_stem {
            h = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init()
                .forward(h);
        }
        for b in &self.blocks {
            h = b.forward(h);
        }
        let [b, c, _, _] = h.dims();
        self.fc.forward(h.mean_dim(3).mean_dim(2).reshape([b, c]))
    }
}
