fn main() {
    for f in ["trojan_sq.png", "trojan_wm.png", "l0_inv.png", "l2_inv.png"] {
        let img = image::open(format!("../shared/data/triggers/{f}"))
            .unwrap()
            .to_rgb8();
        let (w, h) = img.dimensions();
        let mut nz = 0;
        let (mut y0, mut y1, mut x0, mut x1) = (999, 0, 999, 0);
        let mut mx = 0u8;
        let mut sum = 0u64;
        for (x, y, p) in img.enumerate_pixels() {
            if p.0.iter().any(|&v| v > 0) {
                nz += 1;
                y0 = y0.min(y);
                y1 = y1.max(y);
                x0 = x0.min(x);
                x1 = x1.max(x);
            }
            mx = mx.max(*p.0.iter().max().unwrap());
            sum += p.0.iter().map(|&v| v as u64).sum::<u64>();
        }
        println!(
            "{f}: {w}x{h} nonzero {nz} bbox y{y0}-{y1} x{x0}-{x1} max {mx} mean {:.2}",
            sum as f64 / (w * h * 3) as f64
        );
        if f == "trojan_sq.png" || f == "trojan_wm.png" {
            for y in y0..=y1 {
                let row: String = (x0..=x1)
                    .map(|x| {
                        if img.get_pixel(x, y).0[0] > 0 {
                            '#'
                        } else {
                            '.'
                        }
                    })
                    .collect();
                println!("  {row}");
            }
        }
    }
    for f in ["l0_inv_mask.npy", "smooth_cifar10.npy"] {
        let b = std::fs::read(format!("../shared/data/triggers/{f}")).unwrap();
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        let hdr = String::from_utf8_lossy(&b[10..10 + hl]);
        let vals: Vec<f32> = b[10 + hl..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let nz = vals.iter().filter(|v| **v != 0.0).count();
        println!(
            "{f}: {hdr} n {} nonzero {nz} min {} max {}",
            vals.len(),
            vals.iter().cloned().fold(f32::MAX, f32::min),
            vals.iter().cloned().fold(f32::MIN, f32::max)
        );
    }
}
