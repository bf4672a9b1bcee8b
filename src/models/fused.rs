//! Layer norm, softmax and GELU as single autodiff nodes on the flex CPU backend.
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
//! - GELU, the exact (erf) form: y = x·Φ(x), Φ(x) = ½(1 + erf(x/√2)),
//!   ∂x = ∂y·(Φ(x) + x·φ(x)), φ(x) = e^(−x²/2)/√(2π). Flex already runs it as one node, but
//!   calls libm's scalar `erff` and `expf` per element, forward and backward; here erf is a
//!   rational approximation and exp a range-reduced polynomial, both branch-free so the
//!   loops vectorise (within 5·10⁻⁷ of the exact erf, and 2 ulp of exp; tests below). GELU
//!   also takes this path without autodiff (the gate and evaluation).
//!
//! Rows are processed in order on the calling thread (a learning step already runs its
//! shards on separate threads), so the results are the same on every thread count. Any
//! other backend, dtype, axis or checkpointing strategy takes Burn's own ops, as does a
//! layer norm or softmax without autodiff (flex fuses both ops there itself).

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
use multiversion::multiversion;

pub(super) type Ad = Autodiff<Flex>;

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

/// `burn::tensor::activation::gelu(x)`, as one autodiff node (or one vectorised pass
/// without autodiff) where it can be.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match fused_gelu(&x) {
        Some(y) => y,
        None => burn::tensor::activation::gelu(x),
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
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let (y, x_hat, rstd) = layer_norm_forward(
                x.primitive(),
                gamma.primitive(),
                beta.primitive(),
                eps as f32,
            );
            prep.finish((x_hat, rstd, gamma.primitive().clone()), y)
        }
        // Nothing needs x̂ or r: flex's own fused kernel.
        OpsKind::UnTracked(prep) => prep.finish(burn::backend::flex::ops::activation::layer_norm(
            x.primitive().clone(),
            gamma.primitive().clone(),
            Some(beta.primitive().clone()),
            eps,
        )),
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

fn fused_gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    if x.dtype() != DType::F32 {
        return None;
    }
    let x = match x.clone().try_into_primitive::<Ad>() {
        Ok(x) => x,
        // A tensor without autodiff on flex: one vectorised pass.
        Err(_) => {
            let x = x.clone().try_into_primitive::<Flex>().ok()?;
            return Some(Tensor::from_primitive::<Flex>(gelu_forward(&x)));
        }
    };

    #[derive(Debug)]
    struct GeluOp;

    impl Backward<Flex, 1> for GeluOp {
        /// The input x.
        type State = FlexTensor;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            if let Some(node) = node_x {
                grads.register::<Flex>(node.id, gelu_backward(&ops.state, &dy));
            }
        }
    }

    let prep = GeluOp
        .prepare::<NoCheckpointing>([x.node()])
        .compute_bound()
        .stateful();
    let y = gelu_forward(x.primitive());
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(x.primitive().clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(out))
}

/// A tensor's f32 values in row-major order, made contiguous first where they are not.
pub(super) struct Dense(FlexTensor);

impl Dense {
    pub(super) fn of(t: &FlexTensor) -> Self {
        Self(t.to_contiguous())
    }

    pub(super) fn into_tensor(self) -> FlexTensor {
        self.0
    }

    pub(super) fn values(&self) -> &[f32] {
        self.0
            .as_slice::<f32>()
            .expect("a contiguous f32 tensor has a slice")
    }
}

pub(super) fn flex(values: Vec<f32>, shape: Shape) -> FlexTensor {
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
    let (x, gamma, beta) = (Dense::of(x), Dense::of(gamma), Dense::of(beta));
    let (x, gamma, beta) = (x.values(), gamma.values(), beta.values());
    let n = x.len();
    let rows = n / d.max(1);
    let mut y = vec![0f32; n];
    let mut x_hat = vec![0f32; n];
    let mut rstd = vec![0f32; rows];
    layer_norm_rows(x, gamma, beta, eps, d, &mut y, &mut x_hat, &mut rstd);
    (flex(y, shape.clone()), flex(x_hat, shape), rstd)
}

/// The rows of `layer_norm_forward`, compiled for the CPU's SIMD level (every level
/// computes the same bits: no reassociation, no fused multiply-add).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
#[allow(clippy::too_many_arguments)]
fn layer_norm_rows(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
    y: &mut [f32],
    x_hat: &mut [f32],
    rstd: &mut [f32],
) {
    for r in 0..rstd.len() {
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
    let (x_hat, gamma, dy) = (Dense::of(x_hat), Dense::of(gamma), Dense::of(dy));
    let (h, gamma, dy) = (x_hat.values(), gamma.values(), dy.values());
    let n = h.len();
    let mut dx = vec![0f32; n];
    let mut dgamma = vec![0f32; d];
    let mut dbeta = vec![0f32; d];
    layer_norm_grad_rows(h, rstd, gamma, dy, d, &mut dx, &mut dgamma, &mut dbeta);
    (
        flex(dx, shape),
        flex(dgamma, Shape::new([d])),
        flex(dbeta, Shape::new([d])),
    )
}

/// The rows of `layer_norm_backward`, compiled for the CPU's SIMD level (same bits on
/// every level).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
#[allow(clippy::too_many_arguments)]
fn layer_norm_grad_rows(
    h: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dy: &[f32],
    d: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
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
}

/// ∂x of a softmax over the last axis from its output y and ∂y.
fn softmax_backward(y: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let shape = y.shape();
    let d = shape[shape.num_dims() - 1];
    let (y, dy) = (Dense::of(y), Dense::of(dy));
    let (y, dy) = (y.values(), dy.values());
    let mut dx = vec![0f32; y.len()];
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

/// y = x·Φ(x) elementwise.
fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    flex(gelu_values(Dense::of(x).values()), x.shape())
}

/// x·Φ(x) for every value, compiled for the CPU's SIMD level (same bits on every level).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
fn gelu_values(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v * phi(v)).collect()
}

/// ∂x = ∂y·(Φ(x) + x·φ(x)) elementwise.
fn gelu_backward(x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let (xs, dys) = (Dense::of(x), Dense::of(dy));
    flex(gelu_grad_values(xs.values(), dys.values()), x.shape())
}

/// ∂y·(Φ(x) + x·φ(x)) for every value, compiled for the CPU's SIMD level (same bits on
/// every level).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
fn gelu_grad_values(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| g * (phi(v) + v * INV_SQRT_2PI * exp(-0.5 * v * v)))
        .collect()
}

const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x) = ½(1 + erf(x/√2)), the standard normal CDF.
#[inline(always)]
fn phi(x: f32) -> f32 {
    0.5 + 0.5 * erf(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// erf as a rational function of x (odd numerator of degree 13, even denominator of
/// degree 8) on [−4, 4], where f32's erf reaches ±1; the coefficients are Eigen's and
/// XLA's single-precision erf. No branches, so a loop over it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

/// eˣ by Cephes' single-precision recipe: x = n·ln 2 + r with |r| ≤ ½ ln 2, a degree-7
/// polynomial for eʳ, and 2ⁿ built in the exponent bits. Rounding to n adds and subtracts
/// 1.5·2²³, so there is no call to `round` and no branch. Inputs are clamped to
/// [−87.3, 88.7], where the result stays a normal f32.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4 * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e_r * f32::from_bits(((n + 127) as u32) << 23)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;

    /// Elementwise |a − b| ≤ tol·(1 + |b|).
    pub(in crate::models) fn close<const D: usize>(a: &Tensor<D>, b: &Tensor<D>, tol: f32) {
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

    /// The rational erf stays within 5·10⁻⁷ of the exact one, and the polynomial exp
    /// within 2 ulp of the standard library's, over the ranges GELU meets.
    #[test]
    fn erf_and_exp_are_accurate() {
        let mut worst_erf = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4; // [−10, 10]
            worst_erf = worst_erf.max((erf(x) as f64 - libm::erf(x as f64)).abs());
        }
        assert!(worst_erf < 5e-7, "erf off by {worst_erf}");
        let mut worst_exp = 0f64;
        for i in -870_000..=0 {
            let x = i as f32 * 1e-4; // [−87, 0]: GELU's −x²/2
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((exp(x) as f64 - exact).abs() / exact);
        }
        assert!(worst_exp < 2.5e-7, "exp off by a relative {worst_exp}");
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(erf(f32::NAN).is_nan() && exp(f32::NAN).is_nan());
    }

    /// The fused GELU gives Burn's values and input gradient under autodiff, on a
    /// non-contiguous input, and Burn's values without autodiff.
    #[test]
    fn gelu_matches_burns_op() {
        let ad = Device::flex().autodiff();
        let x0 = Tensor::<2>::random([40, 37], Distribution::Normal(0.0, 3.0), &ad);
        let w = Tensor::<2>::random([37, 40], Distribution::Default, &ad);
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let xt = x.clone().swap_dims(0, 1);
            let y = if fused {
                fused_gelu(&xt).expect("the fused GELU applies")
            } else {
                burn::tensor::activation::gelu(xt)
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).unwrap())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        close(&y1, &y2, 1e-6);
        close(&g1, &g2, 1e-6);

        let plain = x0.inner();
        assert!(plain.clone().try_into_primitive::<Flex>().is_ok());
        let y = fused_gelu(&plain).expect("the vectorised GELU applies without autodiff");
        close(&y, &burn::tensor::activation::gelu(plain), 1e-6);
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
