//! Helpers shared by the integration tests of half-precision kernels (`half.rs`,
//! `extensions.rs`).

use rsoptim_core::Element;

/// Values of varied magnitude (1e-4 to 1e2) with either sign, zeros, and now and then inf/NaN.
pub fn values(seed: u64, n: usize, non_finite: bool) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (state >> 33) as u32;
            match r % 64 {
                0 => 0.0,
                1 if non_finite => f32::INFINITY,
                2 if non_finite => f32::NAN,
                _ => {
                    let mag = 10f32.powf((r % 1000) as f32 / 1000.0 * 6.0 - 4.0);
                    if r & 1 == 0 {
                        mag
                    } else {
                        -mag
                    }
                }
            }
        })
        .collect()
}

/// Each value stored (rounded once) as `E`.
pub fn to<E: Element<Math = f32>>(xs: &[f32]) -> Vec<E> {
    xs.iter().map(|&x| E::store(x)).collect()
}

/// Each value loaded (exactly) from `E`.
pub fn load<E: Element<Math = f32>>(xs: &[E]) -> Vec<f32> {
    xs.iter().map(|x| x.load()).collect()
}
