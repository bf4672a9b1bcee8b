//! Blended (Chen et al., 2017; paper Section 4, reference notes §2.3): the whole image is
//! blended with a key pattern, x' = ⌊(1 − α)·x + α·pattern⌋ in 8-bit space (BackdoorBox's
//! truncating cast). The reference implementation blends the Hello Kitty picture with
//! α = 0.4. By default ieu-bench generates the key itself: uniform random noise drawn from
//! the attack seed (Chen et al.'s random-noise key); `trigger_file:` takes any image (e.g.
//! hello_kitty.jpeg), resized to the image size.

use std::path::Path;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The key pattern, CHW u8 at the image size.
pub fn pattern(size: usize, seed: u64, file: Option<&Path>) -> Result<Vec<u8>> {
    match file {
        Some(path) => super::read_image(path, size),
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xB1E7D);
            Ok((0..3 * size * size).map(|_| rng.random::<u8>()).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attacks::Trigger;

    #[test]
    fn blend_truncates_like_backdoorbox() {
        let t = Trigger::Blend {
            weight: vec![0.4],
            pattern: vec![201, 255, 0],
        };
        let mut img = vec![100u8, 0, 255];
        t.apply(&mut img, 1);
        // 0.6*100 + 0.4*201 = 140.4 -> 140; 0.4*255 = 102; 0.6*255 = 153
        assert_eq!(img, vec![140, 102, 153]);
    }

    #[test]
    fn generated_pattern_is_seeded() {
        assert_eq!(pattern(8, 1, None).unwrap(), pattern(8, 1, None).unwrap());
        assert_ne!(pattern(8, 1, None).unwrap(), pattern(8, 2, None).unwrap());
    }
}
