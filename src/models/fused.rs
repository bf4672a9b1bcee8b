//! Layer norm and softmax as single autodiff nodes on the flex CPU backend.
//!
//! Under autodiff, Burn composes layer norm from nine tensor ops (mean, subtract, square,
//! mean, add ε, square root, divide, scale, shift) and softmax from five, each with its own
//! backward node, buffer and pass over memory. Here each records one node whose backward is
//! the closed form:
//!
//! - layer norm over the last axis (d values per row): r = 1/√(σ² + ε), x̂ = (x − μ)·r,
//!   y = γ·x̂ + β. With g = γ·∂y: ∂β = Σ_rows ∂y, ∂γ = Σ_rows ∂y·x̂,
//!   ∂x = r·(g − mean(g) − x̂·mean(g·x̂)).
//! - softmax over the last axis: ∂x = y·(∂y − Σ ∂y·y).
//!
//! Rows are processed in order on the calling thread (a learning step already runs its
//! shards on separate threads), so the results are the same on every thread count. Any
//! other backend, dtype, axis or checkpointing strategy takes Burn's own ops, as does a
//! forward pass without autodiff (flex fuses both ops there itself).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::backend::{BackendTypes, TensorMetadata};
use burn::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

type Ad = Autodiff<Flex>;

/// `norm.forward(x)` for a layer norm with epsilon `eps`, as one autodiff node where it can be.
pub fn layer_norm<const D: usize>(norm: &LayerNorm, x: Tensor<D>, eps: f64) -> Tensor<D> {
    match fused_layer_norm(norm, &x, eps) {
        Some(y) => y,
        None => norm.forward(x),
    }
}

/// `burn::tensor::activation::softmax(x, D - 1)`, as one autodiff node where it can be.
pub fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match fused_softmax(&x) {
        Some(y) => y,
        None => burn::tensor::activation::softmax(x, D - 1),
    }
}

fn autodiff_f32<const D: usize>(
    x: &Tensor<D>,
) -> Option<<Ad as BackendTypes>::FloatTensorPrimitive> {
    if x.dtype() != DType::F32 {
        return None;
    }
    x.clone().try_into_primitive::<Ad>().ok()
}

fn fused_layer_norm<const D: usize>(
    norm: &LayerNorm,
    x: &Tensor<D>,
    eps: f64,
) -> Option<Tensor<D>> {
    let x = autodiff_f32(x)?;
    let gamma = autodiff_f32(&norm.gamma.val())?;
    let beta = autodiff_f32(&norm.beta.as_ref()?.val())?;

    #[derive(Debug)]
    struct LayerNormOp;

    impl Backward<Flex, 3> for LayerNormOp {
        /// x̂, r (one per row) and γ.
        type State = (FlexTensor, Vec<f32>, FlexTensor);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_gamma, node_beta] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            let (x_hat, rstd, gamma) = ops.state;
            let (dx, dgamma, dbeta) = layer_norm_backward(&x_hat, &rstd, &gamma, &dy);
            if let Some(node) = node_x {
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_gamma {
                grads.register::<Flex>(node.id, dgamma);
            }
            if let Some(node) = node_beta {
                grads.register::<Flex>(node.id, dbeta);
            }
        }
    }

    let prep = LayerNormOp
        .prepare::<NoCheckpointing>([x.node(), gamma.node(), beta.node()])
        .compute_bound()
        .stateful();
    let (y, x_hat, rstd) = layer_norm_forward(
        x.primitive(),
        gamma.primitive(),
        beta.primitive(),
        eps as f32,
    );
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish((x_hat, rstd, gamma.primitive().clone()), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(out))
}

fn fused_softmax<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    let x = autodiff_f32(x)?;

    #[derive(Debug)]
    struct SoftmaxOp;

    impl Backward<Flex, 1> for SoftmaxOp {
        /// The output y.
        type State = FlexTensor;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            if let Some(node) = node_x {
                grads.register::<Flex>(node.id, softmax_backward(&ops.state, &dy));
            }
        }
    }

    let prep = SoftmaxOp
        .prepare::<NoCheckpointing>([x.node()])
        .compute_bound()
        .stateful();
    let y = burn::backend::flex::ops::activation::softmax(x.primitive().clone(), D - 1);
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(out))
}

/// The tensor's values in row-major order (a copy only when it is not contiguous).
fn values(t: &FlexTensor) -> (FlexTensor, usize) {
    let t = t.to_contiguous();
    let n = t.layout().num_elements();
    (t, n)
}

fn flex(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// y, x̂ and r for rows of the last axis.
fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
) -> (FlexTensor, FlexTensor, Vec<f32>) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    let (x, n) = values(x);
    let (gamma, _) = values(gamma);
    let (beta, _) = values(beta);
    let (x, gamma, beta) = (
        x.as_slice::<f32>().expect("contiguous"),
        gamma.as_slice::<f32>().expect("contiguous"),
        beta.as_slice::<f32>().expect("contiguous"),
    );
    let rows = n / d.max(1);
    let mut y = vec![0f32; n];
    let mut x_hat = vec![0f32; n];
    let mut rstd = vec![0f32; rows];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let s = 1.0 / (var + eps).sqrt();
        rstd[r] = s;
        let (yr, hr) = (&mut y[r * d..(r + 1) * d], &mut x_hat[r * d..(r + 1) * d]);
        for i in 0..d {
            let h = (row[i] - mean) * s;
            hr[i] = h;
            yr[i] = h * gamma[i] + beta[i];
        }
    }
    (flex(y, shape.clone()), flex(x_hat, shape), rstd)
}

/// ∂x, ∂γ, ∂β of the layer norm from x̂, r, γ and ∂y.
fn layer_norm_backward(
    x_hat: &FlexTensor,
    rstd: &[f32],
    gamma: &FlexTensor,
    dy: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = x_hat.shape();
    let d = shape[shape.num_dims() - 1];
    let (x_hat, n) = values(x_hat);
    let (gamma, _) = values(gamma);
    let (dy, _) = values(dy);
    let (h, gamma, dy) = (
        x_hat.as_slice::<f32>().expect("contiguous"),
        gamma.as_slice::<f32>().expect("contiguous"),
        dy.as_slice::<f32>().expect("contiguous"),
    );
    let mut dx = vec![0f32; n];
    let mut dgamma = vec![0f32; d];
    let mut dbeta = vec![0f32; d];
    let mut g = vec![0f32; d];
    for (r, &s) in rstd.iter().enumerate() {
        let (hr, dyr) = (&h[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let (mut mean_g, mut mean_gh) = (0f32, 0f32);
        for i in 0..d {
            dgamma[i] += dyr[i] * hr[i];
            dbeta[i] += dyr[i];
            g[i] = dyr[i] * gamma[i];
            mean_g += g[i];
            mean_gh += g[i] * hr[i];
        }
        mean_g /= d as f32;
        mean_gh /= d as f32;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            dxr[i] = s * (g[i] - mean_g - hr[i] * mean_gh);
        }
    }
    (
        flex(dx, shape),
        flex(dgamma, Shape::new([d])),
        flex(dbeta, Shape::new([d])),
    )
}

/// ∂x of a softmax over the last axis from its output y and ∂y.
fn softmax_backward(y: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let shape = y.shape();
    let d = shape[shape.num_dims() - 1];
    let (y, n) = values(y);
    let (dy, _) = values(dy);
    let (y, dy) = (
        y.as_slice::<f32>().expect("contiguous"),
        dy.as_slice::<f32>().expect("contiguous"),
    );
    let mut dx = vec![0f32; n];
    for ((dxr, yr), dyr) in dx
        .chunks_exact_mut(d)
        .zip(y.chunks_exact(d))
        .zip(dy.chunks_exact(d))
    {
        let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
        for i in 0..d {
            dxr[i] = yr[i] * (dyr[i] - dot);
        }
    }
    flex(dx, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;

    fn close(a: &Tensor<2>, b: &Tensor<2>, tol: f32) {
        let (a, b) = (
            a.to_data().try_to_vec::<f32>().unwrap(),
            b.to_data().try_to_vec::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    /// The fused layer norm gives Burn's values and gradients (x, γ, β), on a permuted
    /// (non-contiguous) input.
    #[test]
    fn layer_norm_matches_burns_ops() {
        let ad = Device::flex().autodiff();
        let mut norm = LayerNormConfig::new(24).with_epsilon(1e-6).init(&ad);
        norm.gamma = norm
            .gamma
            .map(|g| g.random_like(Distribution::Normal(1.0, 0.3)).require_grad());
        norm.beta = norm
            .beta
            .map(|b| b.map(|b| b.random_like(Distribution::Normal(0.0, 0.3)).require_grad()));
        let x0 = Tensor::<2>::random([24, 30], Distribution::Normal(0.5, 2.0), &ad);
        let w = Tensor::<2>::random([30, 24], Distribution::Default, &ad);
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let xt = x.clone().swap_dims(0, 1);
            let y = if fused {
                fused_layer_norm(&norm, &xt, 1e-6).expect("the fused layer norm applies")
            } else {
                norm.forward(xt)
            };
            let loss = (y.clone() * w.clone()).sum();
            let g = loss.backward();
            let gx = x.grad(&g).unwrap();
            let gg = norm.gamma.val().grad(&g).unwrap().reshape([1, 24]);
            let gb = norm
                .beta
                .as_ref()
                .unwrap()
                .val()
                .grad(&g)
                .unwrap()
                .reshape([1, 24]);
            (y.inner(), gx, gg, gb)
        };
        let (y1, x1, g1, b1) = run(true);
        let (y2, x2, g2, b2) = run(false);
        close(&y1, &y2, 1e-5);
        close(&x1, &x2, 1e-4);
        close(&g1, &g2, 1e-4);
        close(&b1, &b2, 1e-4);
    }

    /// The fused softmax gives Burn's values and input gradient.
    #[test]
    fn softmax_matches_burns_ops() {
        let ad = Device::flex().autodiff();
        let x0 = Tensor::<2>::random([7, 33], Distribution::Normal(0.0, 3.0), &ad);
        let w = Tensor::<2>::random([7, 33], Distribution::Default, &ad);
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let y = if fused {
                fused_softmax(&x).expect("the fused softmax applies")
            } else {
                burn::tensor::activation::softmax(x.clone(), 1)
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).unwrap())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        close(&y1, &y2, 1e-5);
        close(&g1, &g2, 1e-4);
    }
}
