//! The extensions beyond torch's rule (a float32 master copy of each param, stochastic rounding)
//! and the block conversions under them (F16C / AVX-512 float16 conversions behind `unsafe`).
//!
//! * Block conversions, on every SIMD path this CPU has: every float16 bit pattern loads as the
//!   scalar load does; a dense sweep of float32 values (every float16 rounding case) stores as
//!   the scalar rounding does, which itself is checked against an independent oracle (exact
//!   `f64` arithmetic, no bit tricks). Slices of every length 0..=40 and some big ones, at every
//!   start offset 0..16, with source and destination of different lengths, written into
//!   destinations fenced by sentinels that no conversion can produce, so that a store past the
//!   end of its slice is caught.
//! * Master copies: the step is the float32 step on the master values, the param their rounding.
//! * Stochastic rounding: unbiased, one of the two neighbours, the same bits for every SIMD path
//!   and thread count, keyed by seed, stream, step and element index, the state untouched by it.
//!
//! Block conversions must give the scalar ones' bits exactly, NaN payloads included (the scalar
//! float16 conversions keep a NaN's payload and make it quiet, as F16C does; bfloat16 makes
//! every NaN 0x7fc0 on every path); the kernels' results are compared with NaN equal to NaN.

mod common;

use common::{load, to};
use std::ops::Range;
use std::sync::OnceLock;

use half::{bf16, f16};
use rsoptim_core::element::{
    f32_to_bf16_bits, f32_to_bf16_bits_stochastic, f32_to_f16_bits, f32_to_f16_bits_stochastic, random_bits,
    stochastic_key,
};
use rsoptim_core::simd::{dispatch, Isa, Kernel};
use rsoptim_core::{
    adam_step, rmsprop_step, round_into, scale_in_place, sgd_step, AdamHyper, AdamTensor, Element, Error, Executor,
    RmspropHyper, RmspropTensor, RoundTensor, Rounding, SgdHyper, SgdTensor, SimdLevel, StepCount,
};

// ------------------------------------------------------------------------------------------
// Half-precision types, by their bits, and an independent rounding oracle.
// ------------------------------------------------------------------------------------------

trait Half: Element<Math = f32> {
    const NAME: &'static str;
    /// Explicit mantissa bits, smallest normal exponent, largest exponent.
    const MANT: i32;
    const EMIN: i32;
    const EMAX: i32;
    /// A signalling NaN that no conversion writes (they write quiet NaNs): marks untouched slots.
    const SENTINEL: u16;
    fn bits(self) -> u16;
    fn of_bits(bits: u16) -> Self;
    /// The scalar rounding to nearest under test.
    fn nearest_bits(x: f32) -> u16;
    fn stochastic_bits(x: f32, random: u32) -> u16;
}

/// `Half` for a type: its name, format constants, sentinel and the scalar roundings under test.
macro_rules! impl_half {
    ($t:ty, $name:literal, mant: $mant:literal, emin: $emin:literal, emax: $emax:literal, sentinel: $sentinel:literal,
     nearest: $nearest:path, stochastic: $stochastic:path) => {
        impl Half for $t {
            const NAME: &'static str = $name;
            const MANT: i32 = $mant;
            const EMIN: i32 = $emin;
            const EMAX: i32 = $emax;
            const SENTINEL: u16 = $sentinel;
            fn bits(self) -> u16 {
                self.to_bits()
            }
            fn of_bits(bits: u16) -> Self {
                <$t>::from_bits(bits)
            }
            fn nearest_bits(x: f32) -> u16 {
                $nearest(x)
            }
            fn stochastic_bits(x: f32, random: u32) -> u16 {
                $stochastic(x, random)
            }
        }
    };
}

impl_half!(f16, "float16", mant: 10, emin: -14, emax: 15, sentinel: 0x7d5a,
    nearest: f32_to_f16_bits, stochastic: f32_to_f16_bits_stochastic);
impl_half!(bf16, "bfloat16", mant: 7, emin: -126, emax: 127, sentinel: 0x7f9a,
    nearest: f32_to_bf16_bits, stochastic: f32_to_bf16_bits_stochastic);

/// A float32 sentinel no float16/bfloat16 load writes (their low 13 bits are zero).
const SENTINEL32: u32 = 0x7fba_dbad;

/// `x` rounded to nearest (ties to even) in `E`, computed in exact `f64` arithmetic: the quantum
/// of `x`'s binade (or of the subnormals), rounding to a whole number of quanta, and infinity
/// where the result reaches `2^(EMAX + 1)`. Shares nothing with the crate's bit tricks.
fn oracle<E: Half>(x: f32) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = f64::from(x).abs();
    if a.is_infinite() {
        return f64::from(x);
    }
    // Float32 subnormals have exponent field 0; both types' subnormal ranges contain them.
    let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
    let quantum = pow2(exponent.max(E::EMIN) - E::MANT);
    // `a / quantum` is below 2^(MANT + 2) and exact; adding and taking away 2^52 rounds it to a
    // whole number, ties to even (f64's own rounding, as `round_ties_even` but without a libm call).
    let mut r = ((a / quantum + pow2(52)) - pow2(52)) * quantum;
    if r >= pow2(E::EMAX + 1) {
        r = f64::INFINITY;
    }
    r.copysign(f64::from(x))
}

/// `2^e` for a normal `f64` exponent.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// The same bits, NaN payloads included: every SIMD path makes the same NaN.
fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits()
}

fn same_half<E: Half>(a: u16, b: u16) -> bool {
    a == b
}

/// The same value, any NaN equal to any NaN: for results of arithmetic, whose NaN payloads
/// depend on the operations' order.
fn same_value(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Checks the scalar rounding of `x` against the oracle.
fn assert_nearest_is_exact<E: Half>(x: f32) {
    let got = f64::from(E::of_bits(E::nearest_bits(x)).load());
    let want = oracle::<E>(x);
    assert!(
        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
        "{} nearest of {x:e} ({:#010x}): {got:e}, oracle {want:e}",
        E::NAME,
        x.to_bits()
    );
}

// ------------------------------------------------------------------------------------------
// Block conversions through `dispatch`, slice by slice.
// ------------------------------------------------------------------------------------------

/// Source range, destination range.
type Parts = Vec<(Range<usize>, Range<usize>)>;

/// `E::load_block` of each source range into its destination range, compiled for the ISA
/// `dispatch` picks.
struct LoadParts<'a, E: Element> {
    src: &'a [E],
    dst: &'a mut [E::Math],
    parts: &'a Parts,
}

impl<E: Element> Kernel for LoadParts<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let LoadParts { src, dst, parts } = self;
        for (s, d) in parts {
            E::load_block(isa, &src[s.clone()], &mut dst[d.clone()]);
        }
    }
}

/// `E::store_block` of each source range into its destination range.
struct StoreParts<'a, E: Element> {
    src: &'a [E::Math],
    dst: &'a mut [E],
    parts: &'a Parts,
}

impl<E: Element> Kernel for StoreParts<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let StoreParts { src, dst, parts } = self;
        for (s, d) in parts {
            E::store_block(isa, &src[s.clone()], &mut dst[d.clone()]);
        }
    }
}

/// Untouched destination slots between slices: more than the widest vector (16 lanes), so a
/// store that runs past its slice lands in a gap.
const GAP: usize = 17;

/// Lengths that give the 8- and 16-lane loops every tail, and some big ones.
fn lengths() -> Vec<usize> {
    (0..=40).chain([63, 64, 65, 255, 256, 257, 1000, 4099]).collect()
}

/// The whole source as one slice (the SIMD body for all but the last few elements).
fn whole(n: usize) -> (Parts, usize) {
    (vec![(0..n, GAP..GAP + n)], n + 2 * GAP)
}

/// The source from `start` on, cut into consecutive slices of `lengths()` (cycled; the
/// remainder last), so that every element passes through some body or tail at shifting
/// alignments, each slice written to its own place fenced by gaps. Returns the parts and the
/// destination's length.
fn segments(n: usize, start: usize) -> (Parts, usize) {
    let mut parts = Vec::new();
    let (mut s, mut d) = (start, GAP);
    for len in lengths().into_iter().cycle() {
        let len = len.min(n - s);
        parts.push((s..s + len, d..d + len));
        (s, d) = (s + len, d + len + GAP);
        if s == n {
            break;
        }
    }
    (parts, d)
}

/// Slices whose source and destination lengths differ (every pair of lengths up to 40, and some
/// big ones): the conversions convert the shorter length and must leave the rest alone.
fn mismatched(n: usize) -> (Parts, usize) {
    let mut pairs: Vec<(usize, usize)> = (0..=40).flat_map(|a| (0..=40).map(move |b| (a, b))).collect();
    pairs.extend([(300, 257), (257, 300), (1000, 4099), (4099, 1000), (16, 4099), (4099, 17)]);
    let mut parts = Vec::new();
    let (mut s, mut d) = (0, GAP);
    for (a, b) in pairs {
        if s + a > n {
            s = 0;
        }
        parts.push((s..s + a, d..d + b));
        (s, d) = (s + a + 1, d + b + GAP);
    }
    (parts, d)
}

/// After `parts` were converted into `dst` (whose slots held `sentinel`): the first
/// `min(source, destination)` slots of each part hold `ok` values of their source elements,
/// every other slot still holds the sentinel.
fn check_parts<B: Copy + PartialEq + std::fmt::Debug>(
    dst: &[B],
    parts: &Parts,
    sentinel: B,
    ok: impl Fn(B, usize) -> bool,
    what: &str,
) {
    let mut source: Vec<Option<usize>> = vec![None; dst.len()];
    for (s, d) in parts {
        for k in 0..s.len().min(d.len()) {
            source[d.start + k] = Some(s.start + k);
        }
    }
    for (i, (&got, from)) in dst.iter().zip(source).enumerate() {
        match from {
            Some(j) => assert!(got != sentinel && ok(got, j), "{what}: dst[{i}] (from src[{j}]) = {got:?}"),
            None => assert!(got == sentinel, "{what}: dst[{i}] lies outside every slice but was written: {got:?}"),
        }
    }
}

fn load_parts<E: Half>(level: SimdLevel, src: &[E], (parts, dst_len): &(Parts, usize)) -> Vec<u32> {
    let mut dst = vec![f32::from_bits(SENTINEL32); *dst_len];
    dispatch(level, LoadParts::<E> { src, dst: &mut dst, parts });
    dst.iter().map(|x| x.to_bits()).collect()
}

fn store_parts<E: Half>(level: SimdLevel, src: &[f32], (parts, dst_len): &(Parts, usize)) -> Vec<u16> {
    let mut dst = vec![E::of_bits(E::SENTINEL); *dst_len];
    dispatch(level, StoreParts::<E> { src, dst: &mut dst, parts });
    dst.iter().map(|x| x.bits()).collect()
}

/// Every layout for loads of every bit pattern of `E`, on every path, against the scalar load.
fn exercise_loads<E: Half>() {
    let src: Vec<E> = (0..=u16::MAX).map(E::of_bits).collect();
    let want: Vec<f32> = src.iter().map(|x| x.load()).collect();
    let n = src.len();
    let layouts: Vec<(Parts, usize)> =
        [whole(n), mismatched(n)].into_iter().chain((0..16).map(|start| segments(n, start))).collect();
    for level in SimdLevel::available() {
        for (k, layout) in layouts.iter().enumerate() {
            let got = load_parts::<E>(level, &src, layout);
            let what = format!("{} load, {level}, layout {k}", E::NAME);
            check_parts(&got, &layout.0, SENTINEL32, |g, j| same_f32(f32::from_bits(g), want[j]), &what);
        }
    }
}

/// Stores of `values` on every path against the scalar rounding (checked against the oracle):
/// as one slice; with `all_layouts` also cut at every length from every offset, and mismatched;
/// with `cut_from`, cut at every length from that offset.
fn exercise_stores<E: Half>(values: &[f32], all_layouts: bool, cut_from: Option<usize>) {
    let want: Vec<u16> = values.iter().map(|&x| E::nearest_bits(x)).collect();
    for &x in values {
        assert_nearest_is_exact::<E>(x);
    }
    let n = values.len();
    let mut layouts = Vec::new();
    if all_layouts {
        layouts.push(mismatched(n));
        layouts.extend((0..16).map(|start| segments(n, start.min(n))));
    }
    layouts.extend(cut_from.map(|start| segments(n, start.min(n))));
    for level in SimdLevel::available() {
        let report = |what: &str, j: usize, got: u16| {
            eprintln!("{what}: {:e} ({:#010x}) -> {got:#06x}, scalar {:#06x}", values[j], values[j].to_bits(), want[j]);
        };
        // One slice (checked without the bookkeeping of `check_parts`: this is the dense sweep).
        let whole = whole(n);
        let got = store_parts::<E>(level, values, &whole);
        let what = format!("{} store, {level}, one slice", E::NAME);
        assert!(got[..GAP].iter().chain(&got[GAP + n..]).all(|&b| b == E::SENTINEL), "{what}: written outside");
        for (j, &g) in got[GAP..GAP + n].iter().enumerate() {
            if !same_half::<E>(g, want[j]) {
                report(&what, j, g);
                panic!("{what}: element {j}");
            }
        }
        for (k, layout) in layouts.iter().enumerate() {
            let got = store_parts::<E>(level, values, layout);
            let what = format!("{} store, {level}, layout {k}", E::NAME);
            let ok = |g, j| {
                same_half::<E>(g, want[j]) || {
                    report(&what, j, g);
                    false
                }
            };
            check_parts(&got, &layout.0, E::SENTINEL, ok, &what);
        }
    }
}

/// Special and boundary float32 values for both types: zeros, infinities, NaNs of several
/// payloads and signs, float32 subnormals and the edges of float32's range, the float16
/// subnormal and overflow boundaries (with their neighbours and ties), bfloat16's largest
/// finite values.
#[rustfmt::skip]
fn special_values() -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0x0000_0000, 0x0000_0001, 0x0000_0002, 0x0000_1000, 0x0000_8000, 0x007f_ffff, 0x0040_0000, 0x0080_0000,
        0x0080_0001, 0x7f7f_ffff, 0x7f7f_8000, 0x7f7f_7fff, 0x7f7e_8000, 0x7f7f_0000, 0x7f80_0000, 0x7f80_0001,
        0x7f80_2000, 0x7f80_1fff, 0x7fa0_0000, 0x7fc0_0000, 0x7fc0_0001, 0x7fff_ffff, 0x7fbf_ffff, 0x3f80_0000,
    ];
    let mut floats: Vec<f32> = vec![
        65504.0, 65504.5, 65519.0, 65519.996, 65520.0, 65520.004, 65535.996, 65536.0, 65536.01, 70000.0, 1e10,
        32768.0, 32767.99, 2048.0, 2049.0, 2051.0, 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 0.1, 1.0 / 3.0, 1e-8,
    ];
    // Around float16's subnormal range: 2^-25 (the tie with zero), 2^-24, their odd multiples
    // (ties), the largest subnormal, 2^-14 and the tie between them.
    for k in 0..=2100u32 {
        floats.push(k as f32 * 2f32.powi(-25));
    }
    for x in [2f32.powi(-25), 2f32.powi(-24), 2f32.powi(-14), 2f32.powi(-14) - 2f32.powi(-25), 2f32.powi(-15)] {
        bits.extend([x.to_bits() - 1, x.to_bits(), x.to_bits() + 1]);
    }
    let mut all: Vec<f32> = bits.into_iter().map(f32::from_bits).chain(floats).collect();
    let negatives: Vec<f32> = all.iter().map(|x| -x).collect();
    all.extend(negatives);
    all.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, f32::MIN_POSITIVE, f32::EPSILON]);
    all
}

/// Calls `f` with the values of `iter` in chunks of `CHUNK` (the last one shorter), numbered.
fn chunked(iter: impl Iterator<Item = f32>, mut f: impl FnMut(usize, &[f32])) {
    const CHUNK: usize = 1 << 16;
    let (mut buf, mut k) = (Vec::with_capacity(CHUNK), 0);
    for x in iter {
        buf.push(x);
        if buf.len() == CHUNK {
            f(k, &buf);
            buf.clear();
            k += 1;
        }
    }
    if !buf.is_empty() {
        f(k, &buf);
    }
}

/// A xorshift stream of float32 bit patterns.
fn random_floats(seed: u64, n: usize) -> impl Iterator<Item = f32> {
    let mut state = seed;
    (0..n).map(move |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        f32::from_bits((state >> 16) as u32)
    })
}

#[test]
fn block_loads_are_the_scalar_loads_for_every_bit_pattern_on_every_path() {
    exercise_loads::<f16>();
    exercise_loads::<bf16>();
}

#[test]
fn float16_block_stores_are_the_scalar_rounding_on_every_path() {
    // Special values through every layout.
    exercise_stores::<f16>(&special_values(), true, None);
    let sweep = std::iter::empty()
        // Every sign, exponent and kept mantissa bit, with the 13 dropped bits at the rounding
        // boundaries (zero, just above, just below half, half, just above half, all ones).
        .chain((0..1u32 << 19).flat_map(|high| [0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff].map(|low| (high << 13) | low)))
        // Every float32 whose float16 is subnormal (2^-25 up to 2^-14), positive; every third
        // negative one.
        .chain(102u32 << 23..113u32 << 23)
        .chain((102u32 << 23..113u32 << 23).step_by(3).map(|b| b | 0x8000_0000))
        // Every float32 from 65000 to 66000, both signs (65504, the ties at 65520, 65536).
        .chain((65000f32.to_bits()..=66000f32.to_bits()).flat_map(|b| [b, b | 0x8000_0000]))
        // Float32 subnormals and the values below float16's subnormals, sparsely.
        .chain((0..102u32 << 23).step_by(4099).flat_map(|b| [b, b | 0x8000_0000]))
        .map(f32::from_bits)
        .chain(random_floats(0x2545_f491_4f6c_dd1d, 1 << 20));
    let mut chunks = 0;
    chunked(sweep, |k, values| {
        // Every chunk as one slice on every path; every 8th also cut at every length.
        exercise_stores::<f16>(values, false, (k % 8 == 0).then_some(k / 8 % 16));
        chunks += 1;
    });
    assert!(chunks > 1500, "{chunks}");
}

#[test]
fn bfloat16_block_stores_are_the_scalar_rounding_on_every_path() {
    exercise_stores::<bf16>(&special_values(), true, None);
    chunked(random_floats(7, 1 << 18), |k, values| exercise_stores::<bf16>(values, false, Some(k)));
}

#[test]
fn bfloat16_rounding_is_the_half_crates_with_nan_made_0x7fc0() {
    let check = |x: f32| {
        let ours = f32_to_bf16_bits(x);
        if x.is_nan() {
            assert_eq!(ours, 0x7fc0, "NaN {:#010x}", x.to_bits());
        } else {
            let theirs = bf16::from_f32(x).to_bits();
            assert_eq!(ours, theirs, "{x:e} ({:#010x})", x.to_bits());
        }
        assert_nearest_is_exact::<bf16>(x);
    };
    // Every sign, exponent and kept mantissa bit, with the 16 dropped bits at the rounding
    // boundaries; NaNs and infinities come with them.
    for high in 0..1u32 << 16 {
        for low in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234, 0xedcb] {
            check(f32::from_bits((high << 16) | low));
        }
    }
    // Every 251st float32, and random ones.
    for bits in (0..=u32::MAX).step_by(251) {
        check(f32::from_bits(bits));
    }
    random_floats(11, 1 << 20).for_each(check);
    special_values().into_iter().for_each(check);
}

// ------------------------------------------------------------------------------------------
// Stochastic rounding, the conversions.
// ------------------------------------------------------------------------------------------

/// The two values of `E` around `x` (the same one twice where `x` is exact), as bits.
fn neighbours<E: Half>(x: f32) -> (u16, u16) {
    let nearest = E::nearest_bits(x);
    let v = E::of_bits(nearest).load();
    if v == x {
        (nearest, nearest)
    } else if v.abs() < x.abs() {
        (nearest, nearest + 1) // the next one away from zero (bits are sign and magnitude)
    } else {
        (nearest - 1, nearest)
    }
}

const DRAWS: u64 = 1 << 16;

/// Draws `DRAWS` stochastic roundings of `x` (element indices 0.., key from `stream`): each is
/// one of the two neighbours, and the count of upper ones is within 6 binomial sigmas (plus one,
/// for probabilities too small to have a normal tail) of its expectation.
fn assert_unbiased<E: Half>(x: f32, stream: u64) {
    let (lo, hi) = neighbours::<E>(x);
    let key = stochastic_key(0x5eed, stream, 1);
    let mut up = 0u64;
    for i in 0..DRAWS {
        let got = E::stochastic_bits(x, random_bits(key, i));
        assert!(got == lo || got == hi, "{} {x:e}: drew {got:#06x}, neighbours {lo:#06x} {hi:#06x}", E::NAME);
        up += u64::from(got == hi && hi != lo);
    }
    if lo == hi {
        return;
    }
    let (l, h) = (f64::from(E::of_bits(lo).load()).abs(), f64::from(E::of_bits(hi).load()).abs());
    if h.is_infinite() {
        return; // past the largest finite value: no finite mean
    }
    let p = (f64::from(x).abs() - l) / (h - l);
    let n = DRAWS as f64;
    let sigma = (n * p * (1.0 - p)).sqrt();
    assert!(
        (up as f64 - n * p).abs() <= 6.0 * sigma + 1.0,
        "{} {x:e}: {up} of {DRAWS} up, expected {:.1} (p = {p}, sigma {sigma:.2})",
        E::NAME,
        n * p
    );
}

fn stochastic_test_values<E: Half>() -> Vec<f32> {
    let mut xs = vec![
        1.0 + 2f32.powi(-12),
        1.0 + 2f32.powi(-9),
        1.0 + 0.3 * 2f32.powi(-7),
        0.1,
        1.0 / 3.0,
        1000.3,
        1e-3,
        1e5,
        3e-30,
        1e-40, // float32 subnormal
        f32::MIN_POSITIVE * 1.5,
    ];
    if E::MANT == 10 {
        // float16: subnormal results, below the smallest subnormal, the subnormal/normal edge,
        // just below the largest finite value.
        xs.extend([
            1e-8,
            2f32.powi(-24) * 0.25,
            2f32.powi(-24) * 1.5,
            2f32.powi(-24) * 7.3,
            2f32.powi(-24) * 100.01,
            2f32.powi(-14) * 0.9999,
            2f32.powi(-14) - 2f32.powi(-30),
            2f32.powi(-14) * 1.0001,
            65500.0,
            65490.0,
            65503.9,
        ]);
    } else {
        // bfloat16: just below the largest finite value, halfway and near the top.
        xs.extend([f32::from_bits(0x7f7e_8000), f32::from_bits(0x7f7e_ffff), f32::from_bits(0x7f7e_0001)]);
    }
    // Values of every magnitude the type has, from a fixed stream.
    let mut state = 99u64;
    for _ in 0..64 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let e = ((state >> 40) % (E::EMAX - E::EMIN - E::MANT + 1) as u64) as i32 + E::EMIN - E::MANT;
        let m = 1.0 + (state >> 11 & 0xffff_ffff) as f64 / 2f64.powi(32);
        xs.push((m * 2f64.powi(e)) as f32);
    }
    let negatives: Vec<f32> = xs.iter().map(|x| -x).collect();
    xs.extend(negatives);
    xs
}

#[test]
fn stochastic_rounding_is_unbiased_and_picks_a_neighbour() {
    for (j, &x) in stochastic_test_values::<f16>().iter().enumerate() {
        assert_unbiased::<f16>(x, j as u64);
    }
    for (j, &x) in stochastic_test_values::<bf16>().iter().enumerate() {
        assert_unbiased::<bf16>(x, j as u64);
    }
    // Exact values never move; infinities and NaNs stay; past float16's range is infinity.
    for i in 0..4096 {
        let r = random_bits(stochastic_key(1, 2, 3), i);
        for x in [0.0f32, -0.0, 1.0, -2.5, 65504.0, 2f32.powi(-24), -(2f32.powi(-14)), 2f32.powi(-20) * 3.0] {
            assert_eq!(f32_to_f16_bits_stochastic(x, r), f32_to_f16_bits(x), "{x:e}");
        }
        for x in [0.0f32, -0.0, 1.0, -2.5, 65280.0, 2f32.powi(-133), -(2f32.powi(-126)), f32::from_bits(0x7f7f_0000)] {
            assert_eq!(f32_to_bf16_bits_stochastic(x, r), f32_to_bf16_bits(x), "{x:e}");
        }
        for x in [65536.0f32, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_f16_bits_stochastic(x, r), 0x7c00);
            assert_eq!(f32_to_f16_bits_stochastic(-x, r), 0xfc00);
        }
        assert_eq!(f32_to_bf16_bits_stochastic(f32::INFINITY, r), 0x7f80);
        assert_eq!(f32_to_bf16_bits_stochastic(f32::NEG_INFINITY, r), 0xff80);
        for nan in [0x7fc0_0000u32, 0x7f80_0001, 0xffff_ffff, 0x7fff_ffff] {
            let nan = f32::from_bits(nan);
            assert_eq!(f32_to_bf16_bits_stochastic(nan, r), 0x7fc0);
            assert!(f16::from_bits(f32_to_f16_bits_stochastic(nan, r)).is_nan());
        }
    }
}

/// The bits each conversion draws from, as documented: bfloat16 the low 16 bits of the random
/// word, float16 the low 13 (normal results) or the high 23 (subnormal results). Over every value
/// of those bits (the other bits noise) the count of roundings away from zero is the dropped
/// fraction exactly, or for float16 subnormals (23 random bits against the fraction) its ceiling.
fn assert_exactly_unbiased<E: Half>(x: f32, bits: u32, shift: u32) {
    let (lo, hi) = neighbours::<E>(x);
    let used = ((1u64 << bits) - 1) as u32;
    let mut up = 0u64;
    for k in 0..1u32 << bits {
        let r = (k << shift) | (random_bits(0xabc, u64::from(k)) & !(used << shift));
        let got = E::stochastic_bits(x, r);
        assert!(got == lo || got == hi, "{} {x:e}: {got:#06x}, neighbours {lo:#06x} {hi:#06x}", E::NAME);
        up += u64::from(got == hi && hi != lo);
    }
    let (l, h) = (f64::from(E::of_bits(lo).load()).abs(), f64::from(E::of_bits(hi).load()).abs());
    let expected = if lo == hi { 0.0 } else { (f64::from(x).abs() - l) / (h - l) * f64::from(1u32 << bits) };
    // (Subnormal: up exactly when 23 random bits / 2^23 < the fraction, i.e. for the ceiling.)
    let want = if shift == 0 { expected } else { expected.ceil() };
    assert!(up as f64 == want, "{} {x:e}: {up} of 2^{bits} up, expected {expected}", E::NAME);
}

#[test]
fn stochastic_rounding_is_exactly_unbiased_over_the_random_bits_it_draws() {
    for x in stochastic_test_values::<bf16>() {
        assert_exactly_unbiased::<bf16>(x, 16, 0);
    }
    for x in stochastic_test_values::<f16>() {
        if x.abs() >= 2f32.powi(-14) && x.abs() < 65504.0 {
            assert_exactly_unbiased::<f16>(x, 13, 0);
        }
    }
    // Subnormal float16 results: 2^23 words each, so a few values (exact ones must never move).
    let subnormal =
        [2f32.powi(-24) * 1.5, -(2f32.powi(-24) * 0.25), 2f32.powi(-14) * 0.9999, 2f32.powi(-24) * 3.0, -1e-40, 0.0];
    for x in subnormal {
        assert_exactly_unbiased::<f16>(x, 23, 9);
    }
}

#[test]
fn random_bits_are_distinct_over_indices_and_keys_are_distinct() {
    let key = stochastic_key(3, 4, 5);
    let mut drawn: Vec<u32> = (0..1u64 << 18).map(|i| random_bits(key, i)).collect();
    drawn.sort_unstable();
    drawn.dedup();
    assert_eq!(drawn.len(), 1 << 18);
    // Neighbouring seeds, streams and steps give distinct keys.
    let mut keys: Vec<u64> =
        (0..8).flat_map(|a| (0..8).flat_map(move |b| (0..8).map(move |c| stochastic_key(a, b, c)))).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 512);
}

// ------------------------------------------------------------------------------------------
// The kernels: one harness over the three optimizers.
// ------------------------------------------------------------------------------------------

fn executors() -> &'static [Executor] {
    static EXECUTORS: OnceLock<Vec<Executor>> = OnceLock::new();
    EXECUTORS.get_or_init(|| {
        let mut all = Vec::new();
        for level in SimdLevel::available() {
            for threads in [1, 3] {
                all.push(Executor::new(threads, level).expect("thread pool").with_parallel_min_elements(0));
            }
        }
        assert_eq!((all[0].simd(), all[0].threads()), (SimdLevel::Scalar, 1));
        all
    })
}

fn baseline() -> &'static Executor {
    &executors()[0]
}

/// Tensor sizes: single elements, SIMD tails, block (256) tails, and one that three threads cut
/// into pieces (more than 1.5 pieces of 8192).
const SIZES: [usize; 5] = [1, 37, 300, 4099, 20_003];

/// `common::values` from a seed mixed first (the seeds here are small consecutive integers).
fn values(seed: u64, n: usize, non_finite: bool) -> Vec<f32> {
    common::values(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678, n, non_finite)
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(same_value(a, b), "{what}[{i}]: {a:e} ({:#010x}) vs {b:e} ({:#010x})", a.to_bits(), b.to_bits());
    }
}

/// How many elements differ (NaN equal to NaN).
fn count_different(a: &[f32], b: &[f32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| !same_value(**x, **y)).count()
}

#[derive(Clone, Debug)]
enum Opt {
    Adam(AdamHyper),
    Sgd(SgdHyper),
    Rmsprop(RmspropHyper),
}

impl Opt {
    /// The same optimizer with its grads scaled by `grad_scale` (clipping folded into the step).
    fn with_grad_scale(&self, grad_scale: f64) -> Opt {
        match self {
            Opt::Adam(h) => Opt::Adam(AdamHyper { grad_scale, ..h.clone() }),
            Opt::Sgd(h) => Opt::Sgd(SgdHyper { grad_scale, ..h.clone() }),
            Opt::Rmsprop(h) => Opt::Rmsprop(RmspropHyper { grad_scale, ..h.clone() }),
        }
    }

    /// Whether the maths of a step depends on the step count (Adam's bias corrections).
    fn counts_in_maths(&self) -> bool {
        matches!(self, Opt::Adam(_))
    }
}

fn optimizers() -> Vec<Opt> {
    vec![
        Opt::Adam(AdamHyper { lr: 1e-2, weight_decay: 0.01, amsgrad: true, ..AdamHyper::default() }),
        Opt::Adam(AdamHyper { lr: 1e-2, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() }),
        Opt::Sgd(SgdHyper { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01, ..SgdHyper::default() }),
        Opt::Sgd(SgdHyper { lr: 0.1, momentum: 0.9, dampening: 0.1, maximize: true, ..SgdHyper::default() }),
        Opt::Sgd(SgdHyper { lr: 0.1, weight_decay: 0.01, ..SgdHyper::default() }),
        Opt::Rmsprop(RmspropHyper {
            lr: 1e-2,
            momentum: 0.9,
            centered: true,
            weight_decay: 0.01,
            ..RmspropHyper::default()
        }),
    ]
}

/// One param's buffers. `state` holds Adam's (exp_avg, exp_avg_sq, max_exp_avg_sq), SGD's
/// (momentum_buffer, -, -) and RMSprop's (square_avg, momentum_buffer, grad_avg); those a
/// configuration does not use stay as they are.
#[derive(Clone)]
struct Bufs<P, S> {
    param: Vec<P>,
    grad: Vec<P>,
    state: [Vec<S>; 3],
    master: Option<Vec<f32>>,
    step: f32,
    /// SGD: the momentum buffer has just been made (the first step fills it).
    fresh: bool,
}

/// Each tensor gets its own stream (`stream + index`), as the binding numbers params.
fn rounding_of(rounding: Rounding, tensor: usize) -> Rounding {
    match rounding {
        Rounding::Stochastic { seed, stream } => Rounding::Stochastic { seed, stream: stream + tensor as u64 },
        nearest => nearest,
    }
}

fn step<P: Element<Math = f32>, S: Element<Math = f32>>(
    opt: &Opt,
    ts: &mut [Bufs<P, S>],
    exec: &Executor,
    rounding: Rounding,
) -> Result<(), Error> {
    match opt {
        Opt::Adam(h) => {
            let tensors = ts
                .iter_mut()
                .enumerate()
                .map(|(i, t)| {
                    let [m, v, x] = &mut t.state;
                    AdamTensor::<P, S> {
                        param: &mut t.param,
                        grad: &t.grad,
                        exp_avg: m,
                        exp_avg_sq: v,
                        max_exp_avg_sq: h.amsgrad.then_some(&mut x[..]),
                        step: StepCount::F32(&mut t.step),
                        master_param: t.master.as_deref_mut(),
                        rounding: rounding_of(rounding, i),
                    }
                })
                .collect();
            adam_step(tensors, h, exec)
        }
        Opt::Sgd(h) => {
            let tensors = ts
                .iter_mut()
                .enumerate()
                .map(|(i, t)| SgdTensor::<P, S> {
                    param: &mut t.param,
                    grad: &t.grad,
                    momentum_buffer: (h.momentum != 0.0).then_some(&mut t.state[0][..]),
                    momentum_buffer_is_new: t.fresh,
                    master_param: t.master.as_deref_mut(),
                    rounding: rounding_of(rounding, i),
                    step: Some(StepCount::F32(&mut t.step)),
                })
                .collect();
            sgd_step(tensors, h, exec)?;
            ts.iter_mut().for_each(|t| t.fresh = false);
            Ok(())
        }
        Opt::Rmsprop(h) => {
            let tensors = ts
                .iter_mut()
                .enumerate()
                .map(|(i, t)| {
                    let [sq, buf, avg] = &mut t.state;
                    RmspropTensor::<P, S> {
                        param: &mut t.param,
                        grad: &t.grad,
                        square_avg: sq,
                        momentum_buffer: (h.momentum > 0.0).then_some(&mut buf[..]),
                        grad_avg: h.centered.then_some(&mut avg[..]),
                        step: StepCount::F32(&mut t.step),
                        master_param: t.master.as_deref_mut(),
                        rounding: rounding_of(rounding, i),
                    }
                })
                .collect();
            rmsprop_step(tensors, h, exec)
        }
    }
}

/// Tensors of `SIZES` with random params, grads and state. With `master`, the param is the
/// rounding of nothing in particular (the step must read the master copy, not the param).
fn init<P: Element<Math = f32>, S: Element<Math = f32>>(opt: &Opt, seed: u64, master: bool) -> Vec<Bufs<P, S>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let s = seed * 1000 + 10 * k as u64;
            let values_of_param = values(s, n, true);
            let (a, b) = (values(s + 2, n, false), values(s + 3, n, false));
            let square = |xs: &[f32]| xs.iter().map(|x| x * x).collect::<Vec<_>>();
            let state = match opt {
                Opt::Adam(_) => [to(&a), to(&square(&b)), to(&square(&b).iter().map(|x| x * 1.5).collect::<Vec<_>>())],
                Opt::Sgd(_) => [to(&a), to(&b), to(&b)],
                Opt::Rmsprop(_) => {
                    let sq: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * x + y * y).collect();
                    [to(&sq), to(&b), to(&a)]
                }
            };
            Bufs {
                param: if master { to(&values(s + 4, n, true)) } else { to(&values_of_param) },
                grad: to(&values(s + 1, n, true)),
                state,
                master: master.then_some(values_of_param),
                step: 0.0,
                fresh: true,
            }
        })
        .collect()
}

/// The float32 problem a step on `t` must solve: the master values (or the loaded param) as the
/// param, the loaded grads and state.
fn widen<P: Element<Math = f32>, S: Element<Math = f32>>(t: &Bufs<P, S>) -> Bufs<f32, f32> {
    Bufs {
        param: t.master.clone().unwrap_or_else(|| load(&t.param)),
        grad: load(&t.grad),
        state: t.state.each_ref().map(|s| load(s)),
        master: None,
        step: t.step,
        fresh: t.fresh,
    }
}

/// Everything of `got` equals `want`, bit for bit (NaN payloads aside).
fn assert_same_bufs<P: Element<Math = f32>, S: Element<Math = f32>>(
    got: &[Bufs<P, S>],
    want: &[Bufs<P, S>],
    what: &str,
) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_same(&load(&g.param), &load(&w.param), &format!("{what}: tensor {i} param"));
        assert_same_state(g, w, &format!("{what}: tensor {i}"));
    }
}

/// The state, master and step count of `got` equal `want`'s.
fn assert_same_state<P: Element<Math = f32>, S: Element<Math = f32>>(got: &Bufs<P, S>, want: &Bufs<P, S>, what: &str) {
    for k in 0..3 {
        assert_same(&load(&got.state[k]), &load(&want.state[k]), &format!("{what} state {k}"));
    }
    match (&got.master, &want.master) {
        (Some(g), Some(w)) => assert_same(g, w, &format!("{what} master")),
        (None, None) => {}
        _ => panic!("{what}: master copy appeared or vanished"),
    }
    assert_eq!(got.step.to_bits(), want.step.to_bits(), "{what}: step count");
}

// ------------------------------------------------------------------------------------------
// Master copies.
// ------------------------------------------------------------------------------------------

/// Three steps with a master copy on every executor: each is the float32 step on the master
/// values (with the loaded grads and state), the master holds its result, the param its
/// rounding to nearest, the state its rounding to `S`.
fn check_master<P: Element<Math = f32>, S: Element<Math = f32>>(opt: &Opt, what: &str) {
    for (e, exec) in executors().iter().enumerate() {
        let mut ts = init::<P, S>(opt, 5, true);
        for s in 0..3 {
            let what = format!("{what}, executor {e}, step {s}");
            let mut reference: Vec<Bufs<f32, f32>> = ts.iter().map(widen).collect();
            step(opt, &mut reference, exec, Rounding::Nearest).unwrap();
            step(opt, &mut ts, exec, Rounding::Nearest).unwrap();
            for (i, (t, r)) in ts.iter().zip(&reference).enumerate() {
                let master = t.master.as_ref().expect("master");
                assert_same(master, &r.param, &format!("{what}: tensor {i} master"));
                assert_same(&load(&t.param), &load(&to::<P>(master)), &format!("{what}: tensor {i} param"));
                for k in 0..3 {
                    let want = load(&to::<S>(&r.state[k]));
                    assert_same(&load(&t.state[k]), &want, &format!("{what}: tensor {i} state {k}"));
                }
                assert_eq!(t.step, r.step);
            }
        }
    }
}

#[test]
fn a_step_with_a_master_copy_is_the_float32_step_on_the_master() {
    for opt in optimizers() {
        let what = format!("{opt:?}");
        check_master::<bf16, bf16>(&opt, &format!("bf16/bf16 {what}"));
        check_master::<bf16, f32>(&opt, &format!("bf16/f32 {what}"));
        check_master::<f16, f16>(&opt, &format!("f16/f16 {what}"));
        check_master::<f16, f32>(&opt, &format!("f16/f32 {what}"));
        // A float32 param with a master copy takes the block path: the param is the master.
        check_master::<f32, f32>(&opt, &format!("f32/f32 {what}"));
    }
}

// ------------------------------------------------------------------------------------------
// Clipping folded into the step.
// ------------------------------------------------------------------------------------------

/// Three steps with a grad scale on every executor (plain, with master copies, stochastically
/// rounded): each leaves the params, state and master copies bit for bit as `scale_in_place`
/// on the grads (clip_grad_norm_'s scale) and then a step without one, and the grads untouched.
fn check_grad_scale<P: Element<Math = f32>, S: Element<Math = f32>>(opt: &Opt, what: &str) {
    let rounding = Rounding::Stochastic { seed: 7, stream: 3 };
    for (e, exec) in executors().iter().enumerate() {
        for (master, rounding) in [(false, Rounding::Nearest), (true, Rounding::Nearest), (true, rounding)] {
            let mut fused = init::<P, S>(opt, 11, master);
            let mut clipped = fused.clone();
            for (s, scale) in [0.37, 1.0, 3.0e-3].into_iter().enumerate() {
                let what = format!("{what}, executor {e}, master {master}, {rounding:?}, step {s}, scale {scale}");
                // The unscaled grads (last step scaled `clipped`'s in place).
                let grads: Vec<Vec<P>> = fused.iter().map(|t| t.grad.clone()).collect();
                for (t, g) in clipped.iter_mut().zip(&grads) {
                    t.grad = g.clone();
                }
                scale_in_place(clipped.iter_mut().map(|t| &mut t.grad[..]).collect(), scale as f32, exec);
                step(opt, &mut clipped, exec, rounding).unwrap();
                step(&opt.with_grad_scale(scale), &mut fused, exec, rounding).unwrap();
                assert_same_bufs(&fused, &clipped, &what);
                for (i, (t, g)) in fused.iter().zip(&grads).enumerate() {
                    assert_same(&load(&t.grad), &load(g), &format!("{what}: tensor {i} grad written"));
                }
            }
        }
    }
}

#[test]
fn a_step_with_a_grad_scale_is_the_scale_then_the_step() {
    for opt in optimizers() {
        let what = format!("{opt:?}");
        check_grad_scale::<f32, f32>(&opt, &format!("f32/f32 {what}"));
        check_grad_scale::<bf16, bf16>(&opt, &format!("bf16/bf16 {what}"));
        check_grad_scale::<bf16, f32>(&opt, &format!("bf16/f32 {what}"));
        check_grad_scale::<f16, f16>(&opt, &format!("f16/f16 {what}"));
        check_grad_scale::<f16, f32>(&opt, &format!("f16/f32 {what}"));
    }
}

/// Params at 1.0 with grads of 1.0 and updates of about `lr` per step, far below half an ulp:
/// the plain param never moves; the master moves every step and the param, the master's
/// rounding, moves as soon as the master is past half an ulp.
fn check_accumulation<P: Element<Math = f32>>(opt: &Opt, steps: usize, half_ulp_below_one: f32, what: &str) {
    let n = 300;
    let plain_bufs = || Bufs::<P, f32> {
        param: to(&vec![1.0; n]),
        grad: to(&vec![1.0; n]),
        state: [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
        master: None,
        step: 0.0,
        fresh: true,
    };
    let mut plain = vec![plain_bufs()];
    let mut mastered = vec![Bufs { master: Some(vec![1.0; n]), ..plain_bufs() }];
    let (mut previous, mut moved_at) = (1.0f32, None);
    for s in 1..=steps {
        step(opt, &mut plain, baseline(), Rounding::Nearest).unwrap();
        step(opt, &mut mastered, baseline(), Rounding::Nearest).unwrap();
        assert!(load(&plain[0].param).iter().all(|&p| p == 1.0), "{what}: the plain param moved at step {s}");
        let master = mastered[0].master.as_ref().unwrap();
        assert!(master.iter().all(|&m| m == master[0]), "{what}: elements differ");
        assert!(master[0] < previous, "{what}: the master did not move at step {s}");
        previous = master[0];
        assert_same(&load(&mastered[0].param), &load(&to::<P>(master)), what);
        let p = mastered[0].param[0].load();
        if moved_at.is_none() && p != 1.0 {
            moved_at = Some(s);
            assert!(1.0 - master[0] >= half_ulp_below_one, "{what}: moved at {s} with master {}", master[0]);
        }
        if moved_at.is_none() {
            assert!(1.0 - master[0] <= half_ulp_below_one, "{what}: still 1.0 at {s} with master {}", master[0]);
        }
    }
    let moved_at = moved_at.unwrap_or_else(|| panic!("{what}: the param never moved"));
    assert!(moved_at > 3, "{what}: moved at step {moved_at}: the updates were not small");
}

#[test]
fn a_master_copy_accumulates_updates_below_half_an_ulp() {
    let sgd = |lr| Opt::Sgd(SgdHyper { lr, ..SgdHyper::default() });
    let adam = |lr| Opt::Adam(AdamHyper { lr, ..AdamHyper::default() });
    // bfloat16 below 1.0: ulp 2^-8, half an ulp 2^-9 (about 20 updates of 1e-4).
    check_accumulation::<bf16>(&sgd(1e-4), 40, 2f32.powi(-9), "bf16 sgd");
    check_accumulation::<bf16>(&adam(1e-4), 40, 2f32.powi(-9), "bf16 adam");
    // float16 below 1.0: ulp 2^-11, half an ulp 2^-12 (about 25 updates of 1e-5).
    check_accumulation::<f16>(&sgd(1e-5), 40, 2f32.powi(-12), "f16 sgd");
    check_accumulation::<f16>(&adam(1e-5), 40, 2f32.powi(-12), "f16 adam");
}

// ------------------------------------------------------------------------------------------
// Stochastic rounding in the kernels and in `round_into`.
// ------------------------------------------------------------------------------------------

const SEED: u64 = 0xfeed;
const STREAM: u64 = 3;

fn run_from<P: Element<Math = f32>, S: Element<Math = f32>>(
    opt: &Opt,
    start: &[Bufs<P, S>],
    exec: &Executor,
    rounding: Rounding,
    first_step: f32,
) -> Vec<Bufs<P, S>> {
    let mut ts = start.to_vec();
    ts.iter_mut().for_each(|t| t.step = first_step);
    step(opt, &mut ts, exec, rounding).unwrap();
    ts
}

fn params<P: Element<Math = f32>, S>(ts: &[Bufs<P, S>]) -> Vec<f32> {
    ts.iter().flat_map(|t| load(&t.param)).collect()
}

/// Rounds `sources` into fresh params with `round_into`.
fn rounded<P: Half>(sources: &[Vec<f32>], rounding: Rounding, step: f64, exec: &Executor) -> Vec<f32> {
    let mut out: Vec<Vec<P>> = sources.iter().map(|s| vec![P::of_bits(P::SENTINEL); s.len()]).collect();
    let tensors = out
        .iter_mut()
        .zip(sources)
        .enumerate()
        .map(|(i, (param, source))| RoundTensor { param, source, rounding: rounding_of(rounding, i), step })
        .collect();
    round_into(tensors, exec).unwrap();
    out.iter().flat_map(|p| load(p)).collect()
}

fn check_stochastic<P: Half, S: Element<Math = f32>>(opt: &Opt, master: bool, what: &str) {
    let sr = Rounding::Stochastic { seed: SEED, stream: STREAM };
    let start = init::<P, S>(opt, 11, master);
    let base = run_from(opt, &start, baseline(), sr, 0.0);
    let nearest = run_from(opt, &start, baseline(), Rounding::Nearest, 0.0);
    // The unrounded results: the master copies, or the float32 step on the loaded values.
    let exact: Vec<Vec<f32>> = if master {
        base.iter().map(|t| t.master.clone().unwrap()).collect()
    } else {
        let mut reference: Vec<Bufs<f32, f32>> = start.iter().map(widen).collect();
        step(opt, &mut reference, baseline(), Rounding::Nearest).unwrap();
        reference.into_iter().map(|t| t.param).collect()
    };
    // Each param is its exact value rounded with the bits of (seed, its stream, step 1, its index).
    for (i, (t, x)) in base.iter().zip(&exact).enumerate() {
        assert_eq!(t.step, 1.0);
        let key = stochastic_key(SEED, STREAM + i as u64, 1);
        for (j, (p, &x)) in t.param.iter().zip(x).enumerate() {
            let want = P::stochastic_bits(x, random_bits(key, j as u64));
            assert!(
                same_half::<P>(p.bits(), want),
                "{what}: tensor {i}[{j}] of {x:e}: {:#06x} vs {want:#06x}",
                p.bits()
            );
        }
    }
    // The state, master copy and step count are the nearest run's; the params are not.
    for (i, (b, n)) in base.iter().zip(&nearest).enumerate() {
        assert_same_state(b, n, &format!("{what}: tensor {i}, stochastic vs nearest"));
    }
    let total: usize = SIZES.iter().sum();
    let (sr_params, nearest_params) = (params(&base), params(&nearest));
    assert!(count_different(&sr_params, &nearest_params) > total / 20, "{what}: stochastic rounding is nearest");
    // The same bits on every path and thread count (the first executor reruns the baseline).
    for (e, exec) in executors().iter().enumerate() {
        assert_same_bufs(&run_from(opt, &start, exec, sr, 0.0), &base, &format!("{what}: executor {e}"));
    }
    // Another seed, stream or (where the maths does not count steps) step draws other bits.
    let other = |rounding, first_step, why: &str| {
        let run = run_from(opt, &start, baseline(), rounding, first_step);
        let differ = count_different(&params(&run), &sr_params);
        assert!(differ > total / 20, "{what}: {why} changed only {differ} of {total} params");
        if !opt.counts_in_maths() {
            for (i, (r, n)) in run.iter().zip(&nearest).enumerate() {
                let mut r = r.clone();
                r.step = n.step;
                assert_same_state(&r, n, &format!("{what}: {why}, tensor {i}"));
            }
        }
    };
    other(Rounding::Stochastic { seed: SEED + 1, stream: STREAM }, 0.0, "another seed");
    other(Rounding::Stochastic { seed: SEED, stream: STREAM + 100 }, 0.0, "another stream");
    if !opt.counts_in_maths() {
        other(sr, 5.0, "another step");
    }
    // `round_into` writes the same bits as the step, with the same rounding and step, on every
    // executor; with another step it draws other bits.
    for (e, exec) in executors().iter().enumerate() {
        assert_same(&rounded::<P>(&exact, sr, 1.0, exec), &sr_params, &format!("{what}: round_into, executor {e}"));
        let near = rounded::<P>(&exact, Rounding::Nearest, 1.0, exec);
        assert_same(&near, &nearest_params, &format!("{what}: round_into to nearest, executor {e}"));
    }
    let later = rounded::<P>(&exact, sr, 2.0, baseline());
    assert!(count_different(&later, &sr_params) > total / 20, "{what}: round_into ignores the step");
}

#[test]
fn stochastic_rounding_in_the_kernels_is_keyed_reproducible_and_leaves_the_state_alone() {
    for opt in optimizers() {
        for master in [false, true] {
            let what = format!("{opt:?}, master {master}");
            check_stochastic::<bf16, bf16>(&opt, master, &format!("bf16/bf16 {what}"));
            check_stochastic::<bf16, f32>(&opt, master, &format!("bf16/f32 {what}"));
            check_stochastic::<f16, f16>(&opt, master, &format!("f16/f16 {what}"));
            check_stochastic::<f16, f32>(&opt, master, &format!("f16/f32 {what}"));
        }
    }
}

/// One step of updates much smaller than an ulp, many elements: rounding to nearest leaves every
/// param where it was; stochastic rounding moves a share of them that makes the mean right.
#[test]
fn stochastic_rounding_in_a_step_is_unbiased() {
    let n = 1 << 16;
    let lr = 1e-4;
    let opt = Opt::Sgd(SgdHyper { lr, ..SgdHyper::default() });
    let start = vec![Bufs::<bf16, f32> {
        param: to(&vec![1.0; n]),
        grad: to(&vec![1.0; n]),
        state: [vec![], vec![], vec![]],
        master: None,
        step: 0.0,
        fresh: true,
    }];
    let nearest = run_from(&opt, &start, baseline(), Rounding::Nearest, 0.0);
    assert!(params(&nearest).iter().all(|&p| p == 1.0));
    let exact = 1.0f32 - lr as f32;
    let down = 1.0 - 2f32.powi(-8);
    for exec in executors() {
        let run = run_from(&opt, &start, exec, Rounding::Stochastic { seed: 1, stream: 0 }, 0.0);
        let ps = params(&run);
        assert!(ps.iter().all(|&p| p == 1.0 || p == down));
        let moved = ps.iter().filter(|&&p| p == down).count() as f64;
        let p = f64::from(1.0 - exact) / f64::from(1.0 - down);
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!((moved - n as f64 * p).abs() < 6.0 * sigma, "{moved} moved, expected {}", n as f64 * p);
    }
}

#[test]
fn stochastic_rounding_of_float32_params_is_no_rounding() {
    for opt in optimizers() {
        for master in [false, true] {
            let start = init::<f32, f32>(&opt, 3, master);
            let nearest = run_from(&opt, &start, baseline(), Rounding::Nearest, 0.0);
            for exec in executors() {
                let sr = run_from(&opt, &start, exec, Rounding::Stochastic { seed: 9, stream: 1 }, 0.0);
                assert_same_bufs(&sr, &nearest, &format!("{opt:?}, master {master}"));
            }
        }
    }
}

#[test]
fn sgd_with_stochastic_rounding_and_no_step_count_is_refused_and_writes_nothing() {
    let n = 20_003;
    let (p0, g, b0, m0) =
        (to::<bf16>(&values(1, n, false)), to::<bf16>(&values(2, n, false)), values(3, n, false), values(4, n, false));
    let h = SgdHyper { lr: 0.1, momentum: 0.9, ..SgdHyper::default() };
    let sr = Rounding::Stochastic { seed: 1, stream: 0 };
    for exec in [baseline(), executors().last().unwrap()] {
        let (mut p, mut q, mut b, mut c, mut m) = (p0.clone(), p0.clone(), b0.clone(), b0.clone(), m0.clone());
        let mut count = 0.0f32;
        let tensors = vec![
            SgdTensor::<bf16, f32> {
                param: &mut p,
                grad: &g,
                momentum_buffer: Some(&mut b),
                momentum_buffer_is_new: false,
                master_param: Some(&mut m),
                rounding: sr,
                step: Some(StepCount::F32(&mut count)),
            },
            SgdTensor::<bf16, f32> {
                param: &mut q,
                grad: &g,
                momentum_buffer: Some(&mut c),
                momentum_buffer_is_new: false,
                master_param: None,
                rounding: sr,
                step: None,
            },
        ];
        let err = sgd_step(tensors, &h, exec).unwrap_err();
        assert!(matches!(err, Error::MissingBuffer { tensor: 1, .. }), "{err:?}");
        assert_eq!(count, 0.0, "the first tensor's step was counted");
        assert_same(&load(&p), &load(&p0), "param 0");
        assert_same(&load(&q), &load(&p0), "param 1");
        assert_same(&b, &b0, "buffer 0");
        assert_same(&c, &b0, "buffer 1");
        assert_same(&m, &m0, "master 0");
        // Rounding to nearest needs no step count, and a step count given is counted.
        let (mut p, mut b) = (p0.clone(), b0.clone());
        let t = SgdTensor::<bf16, f32> {
            param: &mut p,
            grad: &g,
            momentum_buffer: Some(&mut b),
            momentum_buffer_is_new: false,
            master_param: None,
            rounding: Rounding::Nearest,
            step: None,
        };
        sgd_step(vec![t], &h, exec).unwrap();
        let t = SgdTensor::<bf16, f32> {
            param: &mut p,
            grad: &g,
            momentum_buffer: Some(&mut b),
            momentum_buffer_is_new: false,
            master_param: None,
            rounding: Rounding::Nearest,
            step: Some(StepCount::F32(&mut count)),
        };
        sgd_step(vec![t], &h, exec).unwrap();
        assert_eq!(count, 1.0);
    }
}

#[test]
fn master_copies_and_round_into_of_the_wrong_length_are_refused_and_write_nothing() {
    for opt in optimizers() {
        let start = init::<bf16, f32>(&opt, 2, true);
        for exec in [baseline(), executors().last().unwrap()] {
            for broken in [SIZES.len() - 1, 0] {
                for delta in [-1i64, 1] {
                    let mut ts = start.clone();
                    let master = ts[broken].master.as_mut().unwrap();
                    if delta < 0 {
                        master.pop();
                    } else {
                        master.push(0.5);
                    }
                    let given = ts.clone();
                    let err = step(&opt, &mut ts, exec, Rounding::Stochastic { seed: 1, stream: 0 }).unwrap_err();
                    assert!(matches!(err, Error::LengthMismatch { tensor, .. } if tensor == broken), "{err:?}");
                    assert_same_bufs(&ts, &given, &format!("{opt:?}, master {broken} off by {delta}"));
                }
            }
        }
    }
    // round_into checks every length before it writes.
    let sources = [vec![0.3f32; 20_003], vec![0.7f32; 50]];
    let (mut a, mut b) = (vec![bf16::from_bits(0x1234); 20_003], vec![bf16::from_bits(0x1234); 49]);
    let tensors = vec![
        RoundTensor { param: &mut a[..], source: &sources[0], rounding: Rounding::Nearest, step: 1.0 },
        RoundTensor { param: &mut b[..], source: &sources[1], rounding: Rounding::Nearest, step: 1.0 },
    ];
    let err = round_into(tensors, executors().last().unwrap()).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { tensor: 1, .. }), "{err:?}");
    assert!(a.iter().chain(&b).all(|x| x.to_bits() == 0x1234));
}
