//! VGG-11 (Simonyan & Zisserman, 2015), configuration A with BatchNorm:
//! 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M (3×3 convolutions, each followed by
//! BatchNorm and ReLU; M = 2×2 max pooling), widths scaled by dim/384 below the `paper`
//! scale.
//!
//! Classifier: the CIFAR variant for every image size — global average pooling and one
//! linear layer (at 32×32 the five pools leave 1×1, where this is the usual CIFAR VGG's
//! flatten + linear). A pooling that would shrink the map below 1×1 (small images) is
//! skipped.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::net::{NetConfig, batch_norm, conv};
use super::vit::Init;

/// Configuration A: widths, 0 = max pooling.
const CONFIG_A: [usize; 13] = [64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];

#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    /// A 2×2 max pooling follows.
    pool: bool,
}

#[derive(Module, Debug)]
pub struct Vgg {
    pub features: Vec<ConvBn>,
    pub classifier: Linear,
}

impl Vgg {
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed ^ 0x766, device);
        let mut features: Vec<ConvBn> = Vec::new();
        let mut c_in = 3;
        let mut size = cfg.vit.image_size;
        for &c in &CONFIG_A {
            if c == 0 {
                if size >= 2 {
                    features.last_mut().unwrap().pool = true;
                    size /= 2;
                }
                continue;
            }
            let c_out = cfg.width(c);
            features.push(ConvBn {
                conv: conv(&mut init, c_in, c_out, 3, 1, 1, 1, true),
                bn: batch_norm(&init, c_out),
                pool: false,
            });
            c_in = c_out;
        }
        Self {
            features,
            classifier: init.linear(c_in, cfg.vit.num_classes),
        }
    }

    pub fn with_new_head(self, num_classes: usize, init: &mut Init) -> Self {
        let d = self.classifier.weight.val().dims()[0];
        Self {
            classifier: init.linear(d, num_classes),
            ..self
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut h = x;
        for f in &self.features {
            h = relu(f.bn.forward(f.conv.forward(h)));
            if f.pool {
                h = MaxPool2dConfig::new([2, 2])
                    .with_strides([2, 2])
                    .init()
                    .forward(h);
            }
        }
        let [b, c, _, _] = h.dims();
        self.classifier
            .forward(h.mean_dim(3).mean_dim(2).reshape([b, c]))
    }
}
