use super::*;

/// L_in = ½δᵀAδ − δᵀBθ, L_out = ½‖δ − c‖² + ½λ‖θ‖², with δ ∈ R³ and θ ∈ R².
struct Quadratic {
    a: [[f64; 3]; 3],
    b: [[f64; 2]; 3],
    c: [f64; 3],
    lambda: f64,
    theta: [f64; 2],
    evals: usize,
}

impl Quadratic {
    fn new() -> Self {
        Self {
            a: [[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]],
            b: [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]],
            c: [0.3, -0.7, 1.1],
            lambda: 0.3,
            theta: [0.8, -0.4],
            evals: 0,
        }
    }
    fn a_mul(&self, d: &[f64]) -> [f64; 3] {
        std::array::from_fn(|i| (0..3).map(|j| self.a[i][j] * d[j]).sum())
    }
    fn b_theta(&self) -> [f64; 3] {
        std::array::from_fn(|i| (0..2).map(|j| self.b[i][j] * self.theta[j]).sum())
    }
    fn bt_mul(&self, d: &[f64]) -> [f64; 2] {
        std::array::from_fn(|j| (0..3).map(|i| self.b[i][j] * d[i]).sum())
    }
    /// A⁻¹x by Gaussian elimination.
    fn a_solve(&self, x: [f64; 3]) -> [f64; 3] {
        let mut m = [[0.0; 4]; 3];
        for i in 0..3 {
            m[i][..3].copy_from_slice(&self.a[i]);
            m[i][3] = x[i];
        }
        for col in 0..3 {
            for row in col + 1..3 {
                let f = m[row][col] / m[col][col];
                for k in col..4 {
                    m[row][k] -= f * m[col][k];
                }
            }
        }
        let mut out = [0.0; 3];
        for i in (0..3).rev() {
            out[i] = (m[i][3] - (i + 1..3).map(|k| m[i][k] * out[k]).sum::<f64>()) / m[i][i];
        }
        out
    }
}

fn f32s<const N: usize>(v: [f64; N]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Bilevel for Quadratic {
    fn inner_grads(&mut self, delta: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        self.evals += 1;
        let d: Vec<f64> = delta.iter().map(|&x| x as f64).collect();
        let ad = self.a_mul(&d);
        let bt = self.b_theta();
        let gd: [f64; 3] = std::array::from_fn(|i| ad[i] - bt[i]);
        let gt = self.bt_mul(&d).map(|x| -x);
        Ok((f32s(gd), f32s(gt)))
    }
    fn outer_grads(&mut self, delta: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        self.evals += 1;
        let gd: [f64; 3] = std::array::from_fn(|i| delta[i] as f64 - self.c[i]);
        let gt = self.theta.map(|t| self.lambda * t);
        Ok((f32s(gd), f32s(gt)))
    }
}

#[test]
fn hypergradient_matches_the_closed_form_implicit_gradient() {
    let mut q = Quadratic::new();
    // δ at the inner fixed point δ* = A⁻¹Bθ.
    let star = q.a_solve(q.b_theta());
    let delta = f32s(star);
    // dF/dθ = λθ + (A⁻¹B)ᵀ(δ* − c) = λθ + Bᵀ A⁻¹ (δ* − c).
    let g = q.a_solve(std::array::from_fn(|i| star[i] - q.c[i]));
    let bt = q.bt_mul(&g);
    let want: [f64; 2] = std::array::from_fn(|j| q.lambda * q.theta[j] + bt[j]);
    // α = 0.3 keeps I − αA contractive (eigenvalues of A are below 2.5); K = 300
    // iterations converge the Neumann series.
    let got = hypergradient(&mut q, &delta, 0.3, 300, 1e-2).unwrap();
    for j in 0..2 {
        assert!(
            (got[j] as f64 - want[j]).abs() < 1e-4,
            "component {j}: {} vs closed form {}",
            got[j],
            want[j]
        );
    }
}

#[test]
fn few_iterations_give_the_truncated_neumann_series() {
    // With K iterations from v = 0, v_K = Σ_{j<K} (I − αA)^j ∇_δL_out, and the
    // hypergradient is λθ + αBᵀv_K. Check K = 5 (I-BAU's default) and the cost 2K + 1.
    let mut q = Quadratic::new();
    let delta = [0.1f32, 0.2, -0.3];
    let alpha = 0.1;
    let g: Vec<f64> = (0..3).map(|i| delta[i] as f64 - q.c[i]).collect();
    let mut v = vec![0.0; 3];
    for _ in 0..5 {
        let av = q.a_mul(&v);
        v = (0..3).map(|i| v[i] - alpha * av[i] + g[i]).collect();
    }
    let btv = q.bt_mul(&v);
    let want: Vec<f64> = (0..2)
        .map(|j| q.lambda * q.theta[j] + alpha * btv[j])
        .collect();
    let got = hypergradient(&mut q, &delta, alpha, 5, 1e-2).unwrap();
    for j in 0..2 {
        assert!(
            (got[j] as f64 - want[j]).abs() < 1e-5,
            "{got:?} vs {want:?}"
        );
    }
    // One outer evaluation, none for the first (zero) v, two per later iteration and
    // two for the mixed term.
    assert_eq!(q.evals, 1 + 2 * 4 + 2);
}

#[test]
fn flatten_round_trips_gradients() {
    let device = Device::flex();
    let cfg = crate::models::VitConfig {
        image_size: 8,
        patch_size: 4,
        dim: 8,
        depth: 1,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 3,
    };
    let vit = Vit::new(&cfg, 1, &device);
    let n: usize = crate::models::named_params(&vit)
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    let flat: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let grads = unflatten(&vit, &flat, &device);
    assert_eq!(flatten(&vit, &grads), flat);
}

#[test]
fn settings_are_checked() {
    assert!(IbauSettings::default().validate().is_ok());
    let bad = IbauSettings {
        patch_fraction: 0.0,
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().contains("patch_fraction"));
}
