//! Multi-head self-attention as one autodiff node on the flex CPU backend.
//!
//! The block's attention, from the fused projection qkv = x·W_qkv + b [B, N, 3d] (laid out
//! `[q | k | v]`, each `[head 0 | head 1 | …]` of width d_h = d/H) to the heads' outputs
//! merged back into [B, N, d], before the output projection:
//!
//!   for each image b and head h:  S = s·Q·Kᵀ,  P = softmax_rows(S),  O = P·V,
//!
//! with s = d_h^(-1/2). Burn composes this from a permute, three slices, reshapes (each a
//! copy of a strided view), a scale, two batched products, a softmax and a head merge, and
//! its backward pass from as many nodes again. Here Q, K and V are read in place from qkv
//! through strides (the `gemm` crate takes any strides), O is written in place into the
//! merged output, and the backward pass is the closed form, with P kept from the forward
//! pass:
//!
//!   ∂V = Pᵀ·∂O,  ∂P = ∂O·Vᵀ,  ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),  ∂Q = s·∂S·K,  ∂K = s·∂Sᵀ·Q,
//!
//! written into the matching columns of ∂qkv. Images and heads are processed in order on
//! the calling thread (a learning step already runs its shards on separate threads), so
//! the numbers are the same on every thread count. Any other backend or dtype takes
//! Burn's own ops (the caller's fallback), as does attention with a probe (AttnBlock's
//! GradRollout needs the gradient with respect to P itself).

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::DType;
use gemm::Parallelism;
use multiversion::multiversion;

use super::fused::{Ad, Dense, exp, flex};

/// softmax(s·Q·Kᵀ)·V for every head, heads merged: qkv [B, N, 3d] → [B, N, d]; `None`
/// where the fused path does not apply (the caller then composes Burn's ops).
pub fn self_attention(qkv: &Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    if qkv.dtype() != DType::F32 {
        return None;
    }
    let [b, n, d3] = qkv.dims();
    if heads == 0 || d3 % (3 * heads) != 0 {
        return None;
    }
    let dims = Dims {
        b,
        n,
        h: heads,
        hd: d3 / (3 * heads),
    };
    let x = match qkv.clone().try_into_primitive::<Ad>() {
        Ok(x) => x,
        // Without autodiff on flex: the forward pass alone, P not kept.
        Err(_) => {
            let x = qkv.clone().try_into_primitive::<Flex>().ok()?;
            let (out, _) = forward(Dense::of(&x).values(), dims, false);
            return Some(Tensor::from_primitive::<Flex>(flex(out, dims.out_shape())));
        }
    };

    #[derive(Debug)]
    struct AttentionOp;

    impl Backward<Flex, 1> for AttentionOp {
        /// qkv (contiguous), every head's P, and the sizes.
        type State = (FlexTensor, Vec<f32>, Dims);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_qkv] = ops.parents;
            let dout = grads.consume::<Flex>(&ops.node);
            if let Some(node) = node_qkv {
                let (qkv, probs, dims) = &ops.state;
                let dqkv = backward(
                    Dense::of(qkv).values(),
                    probs,
                    Dense::of(&dout).values(),
                    *dims,
                );
                grads.register::<Flex>(node.id, flex(dqkv, qkv.shape()));
            }
        }
    }

    let prep = AttentionOp
        .prepare::<NoCheckpointing>([x.node()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let dense = Dense::of(x.primitive());
            let (out, probs) = forward(dense.values(), dims, true);
            prep.finish(
                (dense.into_tensor(), probs, dims),
                flex(out, dims.out_shape()),
            )
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = forward(Dense::of(x.primitive()).values(), dims, false);
            prep.finish(flex(out, dims.out_shape()))
        }
    };
    Some(Tensor::from_primitive::<Ad>(out))
}

/// Images, tokens, heads, head width.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    h: usize,
    hd: usize,
}

impl Dims {
    fn d(&self) -> usize {
        self.h * self.hd
    }
    fn out_shape(&self) -> Shape {
        Shape::new([self.b, self.n, self.d()])
    }
    /// Offset in qkv of head h's Q (part 0), K (1) or V (2) for image b.
    fn at(&self, b: usize, part: usize, h: usize) -> usize {
        b * self.n * 3 * self.d() + part * self.d() + h * self.hd
    }
    fn scale(&self) -> f32 {
        (self.hd as f32).powf(-0.5)
    }
}

/// A row-major view: `rs` between rows, `cs` between columns (a transpose swaps them).
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// dst [m, n] (row stride `dst_rs`, unit column stride) = beta·lhs·rhs, k inner.
///
/// Safety: `dst` must be valid for writing m rows of n and the views for reading
/// m×k and k×n elements at their strides; the callers below index inside slices whose
/// lengths cover every such element.
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: View,
    rhs: View,
    beta: f32,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            0.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The merged heads' output [B, N, d], and every head's P [B, H, N, N] when `keep`.
fn forward(qkv: &[f32], s: Dims, keep: bool) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (s.n, s.d());
    let row = (3 * d) as isize;
    assert_eq!(qkv.len(), s.b * n * 3 * d, "qkv holds B·N·3d values");
    let mut out = vec![0f32; s.b * n * d];
    let mut probs = vec![0f32; if keep { s.b * s.h * n * n } else { n * n }];
    for b in 0..s.b {
        for h in 0..s.h {
            let p = if keep {
                &mut probs[(b * s.h + h) * n * n..][..n * n]
            } else {
                &mut probs[..]
            };
            let view = |part| View {
                ptr: qkv[s.at(b, part, h)..].as_ptr(),
                rs: row,
                cs: 1,
            };
            let (q, k, v) = (view(0), view(1), view(2));
            // Safety: Q, K, V are n rows of hd at row stride 3d inside qkv (the last row
            // of the last head of V ends at the end of qkv); P is n×n; O's rows are hd
            // wide at row stride d inside `out`.
            unsafe {
                matmul(n, n, s.hd, p.as_mut_ptr(), n, q, k.t(), s.scale());
            }
            softmax_rows(p, n);
            let pv = View {
                ptr: p.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            let o = out[b * n * d + h * s.hd..].as_mut_ptr();
            unsafe {
                matmul(n, s.hd, n, o, d, pv, v, 1.0);
            }
        }
    }
    (out, probs)
}

/// ∂qkv [B, N, 3d] from ∂O [B, N, d], given qkv and every head's P.
fn backward(qkv: &[f32], probs: &[f32], dout: &[f32], s: Dims) -> Vec<f32> {
    let (n, d) = (s.n, s.d());
    let row = (3 * d) as isize;
    assert_eq!(dout.len(), s.b * n * d, "∂O holds B·N·d values");
    assert_eq!(probs.len(), s.b * s.h * n * n, "P of every head was kept");
    let mut dqkv = vec![0f32; qkv.len()];
    let mut ds = vec![0f32; n * n];
    for b in 0..s.b {
        for h in 0..s.h {
            let p = &probs[(b * s.h + h) * n * n..][..n * n];
            let pv = View {
                ptr: p.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            let view = |part| View {
                ptr: qkv[s.at(b, part, h)..].as_ptr(),
                rs: row,
                cs: 1,
            };
            let (q, k, v) = (view(0), view(1), view(2));
            let dov = View {
                ptr: dout[b * n * d + h * s.hd..].as_ptr(),
                rs: d as isize,
                cs: 1,
            };
            let mut dst = |part| dqkv[s.at(b, part, h)..].as_mut_ptr();
            // Safety: as in `forward`; ∂qkv has qkv's layout, ∂S is n×n.
            unsafe {
                // ∂V = Pᵀ·∂O
                matmul(n, s.hd, n, dst(2), 3 * d, pv.t(), dov, 1.0);
                // ∂P = ∂O·Vᵀ
                matmul(n, n, s.hd, ds.as_mut_ptr(), n, dov, v.t(), 1.0);
            }
            softmax_grad_rows(&mut ds, p, n);
            let dsv = View {
                ptr: ds.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            unsafe {
                // ∂Q = s·∂S·K, ∂K = s·∂Sᵀ·Q
                matmul(n, s.hd, n, dst(0), 3 * d, dsv, k, s.scale());
                matmul(n, s.hd, n, dst(1), 3 * d, dsv.t(), q, s.scale());
            }
        }
    }
    dqkv
}

/// `softmax_row` for each row of n values, compiled for the CPU's SIMD level (every level
/// computes the same bits: no reassociation, no fused multiply-add).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
fn softmax_rows(p: &mut [f32], n: usize) {
    for r in p.chunks_exact_mut(n) {
        softmax_row(r);
    }
}

/// ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) in place of ∂P, row by row, compiled for the CPU's SIMD
/// level (same bits on every level).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+avx+fma+sse4.2",
    "x86_64+avx2+avx+fma+sse4.2"
))]
fn softmax_grad_rows(ds: &mut [f32], p: &[f32], n: usize) {
    for (dr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
        let dot = dot(dr, pr);
        for (g, y) in dr.iter_mut().zip(pr) {
            *g = y * (*g - dot);
        }
    }
}

/// Softmax of one row in place: y = e^(x − max x) / Σ e^(x − max x). The exponentials
/// are one branch-free pass (it vectorises); the max and the sum run in eight lanes, a
/// fixed order, so the result does not depend on anything but the row.
#[inline(always)]
fn softmax_row(r: &mut [f32]) {
    let max = lanes(r, f32::NEG_INFINITY, f32::max);
    for x in r.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / lanes(r, 0.0, |a, b| a + b);
    for x in r.iter_mut() {
        *x *= inv;
    }
}

/// Σ a·b in eight lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A reduction of `r` by `op` in eight lanes, then across them, then over the tail.
#[inline(always)]
fn lanes(r: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = r.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = op(acc[i], c[i]);
        }
    }
    tail.iter()
        .fold(acc.into_iter().fold(init, &op), |a, &x| op(a, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;

    use crate::models::fused::tests::close;

    /// Burn's ops, as `Attention` composed them before this node.
    fn composed(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n, d3] = qkv.dims();
        let (d, hd) = (d3 / 3, d3 / 3 / heads);
        let qkv = qkv.reshape([b, n, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
        let q: Tensor<4> = qkv.clone().slice([0..1]).reshape([b, heads, n, hd]);
        let k: Tensor<4> = qkv.clone().slice([1..2]).reshape([b, heads, n, hd]);
        let v: Tensor<4> = qkv.slice([2..3]).reshape([b, heads, n, hd]);
        let attn = softmax(
            q.mul_scalar((hd as f64).powf(-0.5))
                .matmul(k.swap_dims(2, 3)),
            3,
        );
        attn.matmul(v).swap_dims(1, 2).reshape([b, n, d])
    }

    /// Values and the gradient with respect to qkv equal Burn's composed ops (3 images,
    /// 7 tokens, 3 heads of width 4; qkv a non-contiguous view), and the forward pass
    /// without autodiff gives the same values.
    #[test]
    fn attention_matches_burns_ops() {
        let ad = Device::flex().autodiff();
        let (b, n, heads, hd) = (3, 7, 3, 4);
        let d = heads * hd;
        let x0 = Tensor::<3>::random([b, 3 * d, n], Distribution::Normal(0.0, 1.5), &ad);
        let w = Tensor::<3>::random([b, n, d], Distribution::Default, &ad);
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let qkv = x.clone().swap_dims(1, 2);
            let y = if fused {
                self_attention(&qkv, heads).expect("the fused attention applies")
            } else {
                composed(qkv, heads)
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).unwrap())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        close(&y1, &y2, 1e-5);
        close(&g1, &g2, 1e-4);

        let plain = x0.inner().swap_dims(1, 2);
        let y = self_attention(&plain, heads).expect("applies without autodiff");
        close(&y, &y1, 1e-6);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut r = vec![1.0, 3.0, -2.0, 3.0, 100.0, -100.0];
        softmax_row(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[4] > 0.99 && r[5] < 1e-30 && (r[1] - r[3]).abs() < 1e-12);
    }
}
