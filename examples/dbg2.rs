use burn::optim::GradientsParams;
use burn::prelude::*;
use ieu_bench::models::{Vit, VitConfig};
fn main() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let cfg = VitConfig {
        image_size: 16,
        patch_size: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 4,
    };
    let mut m = Vit::new(&cfg, 0, &ad);
    let mut optim = ieu_bench::train::adamw();
    let n = 64;
    let mut xs = vec![0f32; n * 3 * 256];
    let mut ys = vec![0i64; n];
    for i in 0..n {
        let q = i % 4;
        ys[i] = q as i64;
        let (oy, ox) = ((q / 2) * 8, (q % 2) * 8);
        for c in 0..3 {
            for y in 0..8 {
                for x in 0..8 {
                    xs[i * 768 + c * 256 + (oy + y) * 16 + ox + x] = 1.0;
                }
            }
        }
    }
    for step in 0..100 {
        let x = Tensor::<4>::from_data(TensorData::new(xs.clone(), [n, 3, 16, 16]), &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(ys.clone(), [n]), &ad);
        let loss = ieu_bench::train::cross_entropy(m.forward(x), y);
        if step % 20 == 0 {
            println!("step {step} loss {}", loss.clone().into_scalar::<f32>());
        }
        let gp = GradientsParams::from_grads(loss.backward(), &m);
        m = optim.step(1e-3, m, gp);
    }
}
