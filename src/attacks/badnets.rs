//! BadNets-white (Gu et al., 2019; paper Section 4 and Appendix A.1): a white square in the
//! lower-right corner replaces the pixels under it (BackdoorBox weight 1). At 32×32 the
//! square is 3×3 (rows/cols 29–31), at 64×64 it is 6×6, as in the reference implementation;
//! in general its side is `round(size_frac · image_size)` with `size_frac = 3/32`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BadnetsWhite {
    /// Side of the square as a fraction of the image side.
    pub size_frac: f64,
}

impl Default for BadnetsWhite {
    fn default() -> Self {
        Self {
            size_frac: 3.0 / 32.0,
        }
    }
}

impl BadnetsWhite {
    pub fn side(&self, image_size: usize) -> usize {
        ((self.size_frac * image_size as f64).round() as usize).clamp(1, image_size)
    }

    /// Stamps the square onto a CHW u8 image.
    pub fn apply(&self, img: &mut [u8], size: usize) {
        let side = self.side(size);
        let hw = size * size;
        for c in 0..3 {
            for y in size - side..size {
                for x in size - side..size {
                    img[c * hw + y * size + x] = 255;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_sizes_match_reference() {
        let b = BadnetsWhite::default();
        assert_eq!(b.side(32), 3);
        assert_eq!(b.side(64), 6);
        assert_eq!(b.side(224), 21);
    }

    #[test]
    fn only_the_corner_changes() {
        let mut img = vec![10u8; 3 * 32 * 32];
        BadnetsWhite::default().apply(&mut img, 32);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let v = img[c * 1024 + y * 32 + x];
                    let corner = y >= 29 && x >= 29;
                    assert_eq!(v, if corner { 255 } else { 10 }, "c{c} y{y} x{x}");
                }
            }
        }
    }
}
