//! BadNets (Gu et al., 2019; paper Section 4, Appendix A.1, reference notes §2.1–2.2).
//!
//! - **BadNets-white**: a white square in the lower-right corner replaces the pixels under
//!   it (BackdoorBox weight 1): 3×3 at 32×32 (rows/cols 29–31), 6×6 at 64×64; in general its
//!   side is `round(size_frac · image_size)` with `size_frac = 3/32`.
//! - **BadNets-pattern**: the 3×3 grid pattern
//!   `[[0,0,255],[0,255,0],[255,0,255]]` (same value in every channel) in the lower-right
//!   corner, weight 1; at other sizes the grid is scaled by nearest neighbour to a square of
//!   side `round(size_frac · image_size)`.

use serde::{Deserialize, Serialize};

use super::Trigger;

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

fn side(size_frac: f64, image_size: usize) -> usize {
    ((size_frac * image_size as f64).round() as usize).clamp(1, image_size)
}

/// A weight-1 patch in the lower-right corner with cell values from `value(r, c)`.
fn corner(size: usize, side: usize, value: impl Fn(usize, usize) -> u8) -> Trigger {
    let hw = size * size;
    let mut weight = vec![0f32; hw];
    let mut pattern = vec![0u8; 3 * hw];
    for r in 0..side {
        for c in 0..side {
            let p = (size - side + r) * size + (size - side + c);
            weight[p] = 1.0;
            for ch in 0..3 {
                pattern[ch * hw + p] = value(r, c);
            }
        }
    }
    Trigger::Blend { weight, pattern }
}

impl BadnetsWhite {
    pub fn side(&self, image_size: usize) -> usize {
        side(self.size_frac, image_size)
    }
    pub fn trigger(&self, size: usize) -> Trigger {
        corner(size, self.side(size), |_, _| 255)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BadnetsPattern {
    pub size_frac: f64,
}

impl Default for BadnetsPattern {
    fn default() -> Self {
        Self {
            size_frac: 3.0 / 32.0,
        }
    }
}

pub const GRID: [[u8; 3]; 3] = [[0, 0, 255], [0, 255, 0], [255, 0, 255]];

impl BadnetsPattern {
    pub fn trigger(&self, size: usize) -> Trigger {
        let s = side(self.size_frac, size);
        corner(size, s, |r, c| GRID[r * 3 / s][c * 3 / s])
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
        BadnetsWhite::default().trigger(32).apply(&mut img, 32);
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

    #[test]
    fn pattern_matches_reference_grid_at_32() {
        let mut img = vec![77u8; 3 * 32 * 32];
        BadnetsPattern::default().trigger(32).apply(&mut img, 32);
        for (r, row) in GRID.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                for ch in 0..3 {
                    assert_eq!(img[ch * 1024 + (29 + r) * 32 + 29 + c], *v);
                }
            }
        }
        assert_eq!(img[28 * 32 + 28], 77);
    }
}
