//! The boundary to the Python layer, fuzzed: byte columns of any length, words of any value,
//! sizes that overflow, zero-sized buffers anywhere, misaligned addresses and adversarial
//! overlaps go through `table::Table` and `raw::check_buffers`, whose verdict must match a
//! brute-force model (every pair, in `u128`), and nothing may panic.
//!
//! No buffer made here is ever read or written: only zero-length ones are sliced, which must not
//! touch their address.

use proptest::prelude::*;
use rsoptim_core::raw::{check_buffers, Buffer};
use rsoptim_core::table::{words, Dtype, Table};
use rsoptim_core::Error;

/// What `check_buffers` should say.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Ok,
    /// Null, misaligned or too big.
    Invalid,
    /// A written buffer shares memory with another one.
    Overlap,
}

fn model(buffers: &[Buffer]) -> Verdict {
    let live: Vec<&Buffer> = buffers.iter().filter(|b| b.len > 0).collect();
    for b in &live {
        let bytes = b.len as u128 * b.elem_size as u128;
        if b.addr == 0
            || b.addr % b.align != 0
            || bytes > isize::MAX as u128
            || b.addr as u128 + bytes > usize::MAX as u128
        {
            return Verdict::Invalid;
        }
    }
    let end = |b: &Buffer| b.addr as u128 + b.len as u128 * b.elem_size as u128;
    for (i, a) in live.iter().enumerate() {
        for b in &live[i + 1..] {
            if (a.addr as u128) < end(b) && (b.addr as u128) < end(a) && (a.written || b.written) {
                return Verdict::Overlap;
            }
        }
    }
    Verdict::Ok
}

fn verdict(result: Result<(), Error>) -> Verdict {
    match result {
        Ok(()) => Verdict::Ok,
        Err(Error::InvalidBuffer(_)) => Verdict::Invalid,
        Err(Error::Overlap(_)) => Verdict::Overlap,
        Err(e) => panic!("check_buffers gave an unexpected error: {e:?}"),
    }
}

fn pack(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Words of every kind: small, aligned addresses, odd ones, and values at the edges of usize and
/// isize, where sizes and ends overflow.
fn any_word() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..64,
        4 => (1u64..256).prop_map(|k| 0x1_0000 + 4 * k),
        1 => (1u64..256).prop_map(|k| 0x1_0000 + k),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 7),
        1 => Just(i64::MAX as u64),
        1 => Just(i64::MAX as u64 / 4 + 1),
        1 => Just(i64::MAX as u64 / 8),
        1 => Just(u64::MAX / 4 + 1),
        1 => any::<u64>(),
    ]
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F64), Just(Dtype::BF16), Just(Dtype::F16)]
}

/// Adds a column of `T` (or, for `steps`, a step column) and returns whether it was accepted;
/// a count that does not match the tensors must be refused.
fn add_column(table: &mut Table, addrs: &[u64], dtype: Dtype, written: bool, steps: bool) -> bool {
    let bytes = pack(addrs);
    let result = match (steps, dtype) {
        (true, d) => table.steps(d, &bytes).map(|_| ()),
        (false, Dtype::F32) => table.column::<f32>("col", &bytes, written).map(|_| ()),
        (false, Dtype::F64) => table.column::<f64>("col", &bytes, written).map(|_| ()),
        (false, Dtype::BF16) => table.column::<half::bf16>("col", &bytes, written).map(|_| ()),
        (false, Dtype::F16) => table.column::<half::f16>("col", &bytes, written).map(|_| ()),
    };
    // Step counts are float32 or float64: a half-precision step column is refused.
    let half_steps = steps && matches!(dtype, Dtype::BF16 | Dtype::F16);
    assert_eq!(result.is_ok(), addrs.len() == table.len() && !half_steps, "{result:?}");
    if let Err(e) = &result {
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }
    result.is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn byte_columns_of_any_length(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        match words("col", &bytes) {
            Ok(w) => {
                prop_assert_eq!(bytes.len() % 8, 0);
                let back: Vec<u8> = w.iter().flat_map(|&x| (x as u64).to_ne_bytes()).collect();
                prop_assert_eq!(&back, &bytes);
            }
            Err(e) => {
                prop_assert!(bytes.len() % 8 != 0);
                prop_assert!(matches!(e, Error::InvalidArgument(_)));
            }
        }
        // Through a table: a ragged numels column, or a ragged address column, is an error.
        match Table::new(&bytes) {
            Ok(mut table) => {
                prop_assert_eq!(table.len(), bytes.len() / 8);
                let ragged = &bytes[..bytes.len().saturating_sub(3)];
                prop_assert_eq!(table.column::<f32>("col", ragged, true).is_err(), !ragged.is_empty() || !table.is_empty());
            }
            Err(_) => prop_assert!(bytes.len() % 8 != 0),
        }
    }

    #[test]
    fn tables_of_any_words_agree_with_the_model(
        numels in prop::collection::vec(any_word(), 0..6),
        columns in prop::collection::vec(
            (prop::collection::vec(any_word(), 0..6), dtype(), any::<bool>(), prop::bool::weighted(0.2)),
            0..4,
        ),
    ) {
        let mut table = Table::new(&pack(&numels)).expect("whole words");
        let mut expected = Vec::new();
        for (addrs, dtype, written, steps) in &columns {
            if add_column(&mut table, addrs, *dtype, *written, *steps) {
                for (i, &addr) in addrs.iter().enumerate() {
                    let (len, written) = if *steps { (1, true) } else { (numels[i] as usize, *written) };
                    expected.push(match dtype {
                        Dtype::F32 => Buffer::of::<f32>("col", i, addr as usize, len, written),
                        Dtype::F64 => Buffer::of::<f64>("col", i, addr as usize, len, written),
                        Dtype::BF16 => Buffer::of::<half::bf16>("col", i, addr as usize, len, written),
                        Dtype::F16 => Buffer::of::<half::f16>("col", i, addr as usize, len, written),
                    });
                }
            }
        }
        let want = model(&expected);
        prop_assert_eq!(verdict(table.check()), want);
        prop_assert_eq!(verdict(check_buffers(table.buffers())), model(table.buffers()));
    }
}

/// How an extra buffer sits against one of the separate ones.
#[derive(Clone, Copy, Debug)]
enum Relation {
    StartsInside,
    EndsInside,
    Contains,
    Equal,
    Inside,
    AdjacentBefore,
    AdjacentAfter,
}

fn relation() -> impl Strategy<Value = Relation> {
    use Relation::*;
    prop_oneof![
        Just(StartsInside),
        Just(EndsInside),
        Just(Contains),
        Just(Equal),
        Just(Inside),
        Just(AdjacentBefore),
        Just(AdjacentAfter)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Separate buffers in address order (gaps of 0 to 3 elements), plus one placed against one
    /// of them, then all shuffled: the sweep must find exactly the overlaps the model finds.
    #[test]
    fn adversarial_overlaps_agree_with_the_model(
        layout in prop::collection::vec((1usize..16, 0usize..4, any::<bool>(), any::<bool>()), 1..10),
        target in any::<prop::sample::Index>(),
        rel in relation(),
        extra_written in any::<bool>(),
        extra_wide in any::<bool>(),
        order in any::<prop::sample::Index>(),
    ) {
        let mut buffers = Vec::new();
        let mut at = 0x10_0000usize;
        for (i, &(len, gap, written, wide)) in layout.iter().enumerate() {
            let (b, bytes) = if wide {
                at = at.next_multiple_of(8);
                (Buffer::of::<f64>("base", i, at, len, written), 8 * len)
            } else {
                (Buffer::of::<f32>("base", i, at, len, written), 4 * len)
            };
            buffers.push(b);
            at += bytes + 4 * gap;
        }
        prop_assert_eq!(model(&buffers), Verdict::Ok);
        let t = buffers[target.index(buffers.len())];
        let (start, end) = (t.addr, t.addr + t.len * t.elem_size);
        let size = if extra_wide { 8 } else { 4 };
        // The extra buffer's [lo, hi) in bytes, rounded out to whole elements.
        let (lo, hi) = match rel {
            Relation::StartsInside => (end - 4, end + 16),
            Relation::EndsInside => (start.saturating_sub(16), start + 4),
            Relation::Contains => (start.saturating_sub(8), end + 8),
            Relation::Equal => (start, end),
            Relation::Inside => (start + (end - start) / 2 / 4 * 4, end - (end - start) / 4 / 4 * 4),
            Relation::AdjacentBefore => (start - 16, start),
            Relation::AdjacentAfter => (end, end + 16),
        };
        let len = (hi - lo).div_ceil(size).max(1);
        let extra = if extra_wide {
            Buffer::of::<f64>("extra", 99, lo, len, extra_written)
        } else {
            Buffer::of::<f32>("extra", 99, lo, len, extra_written)
        };
        buffers.push(extra);
        let k = order.index(buffers.len());
        buffers.rotate_left(k);
        let want = model(&buffers);
        prop_assert_eq!(verdict(check_buffers(&buffers)), want, "{:?} {:?}", rel, buffers);
        // A written buffer placed to overlap, and valid, must be refused as an overlap.
        let overlapping = !matches!(rel, Relation::AdjacentBefore | Relation::AdjacentAfter) || len * size > hi - lo;
        if extra_written && overlapping && lo % size == 0 {
            prop_assert_eq!(want, Verdict::Overlap);
        }
    }
}

#[test]
fn sizes_that_overflow_are_invalid_never_a_panic() {
    let cases = [
        (0x1000, usize::MAX),                  // len * 4 overflows
        (0x1000, usize::MAX / 4 + 1),          // len * 4 wraps to a small number
        (usize::MAX - 7, 4),                   // addr + bytes wraps
        (0x1000, isize::MAX as usize / 4 + 1), // more than isize::MAX bytes
    ];
    for (addr, len) in cases {
        let numels = pack(&[len as u64]);
        let mut table = Table::new(&numels).unwrap();
        table.column::<f32>("col", &pack(&[addr as u64]), true).unwrap();
        assert!(matches!(table.check(), Err(Error::InvalidBuffer(_))), "{addr:#x} {len}");
        let mut table = Table::new(&numels).unwrap();
        table.column::<f32>("col", &pack(&[addr as u64]), false).unwrap();
        assert!(matches!(table.check(), Err(Error::InvalidBuffer(_))), "{addr:#x} {len}");
    }
}

#[test]
fn zero_sized_buffers_anywhere_are_accepted_and_never_touched() {
    // Two tensors of 0 elements at null, odd and top-of-memory addresses, in every role.
    let mut table = Table::new(&pack(&[0, 0])).unwrap();
    let a = table.column::<f64>("a", &pack(&[0, 1]), true).unwrap();
    let b = table.column::<f64>("b", &pack(&[1, u64::MAX]), true).unwrap();
    let c = table.column::<f32>("c", &pack(&[3, 3]), false).unwrap();
    table.check().expect("empty buffers alias nothing and need no address");
    for i in 0..2 {
        // SAFETY: empty slices; the table checked them; each written one is sliced once.
        unsafe {
            assert!(table.written(a, i).is_empty());
            assert!(table.written(b, i).is_empty());
            assert!(table.read(c, i).is_empty());
        }
    }
}

#[test]
fn misaligned_addresses_are_invalid() {
    for (addr, dtype) in [(0x1001u64, Dtype::F32), (0x1002, Dtype::F32), (0x1004, Dtype::F64), (0x1007, Dtype::F64)] {
        let mut table = Table::new(&pack(&[1])).unwrap();
        add_column(&mut table, &[addr], dtype, false, false);
        assert!(matches!(table.check(), Err(Error::InvalidBuffer(_))), "{addr:#x} {dtype:?}");
        let mut table = Table::new(&pack(&[7])).unwrap();
        add_column(&mut table, &[addr], dtype, true, true);
        assert!(matches!(table.check(), Err(Error::InvalidBuffer(_))), "step {addr:#x} {dtype:?}");
    }
}

#[test]
fn column_counts_must_match_the_tensors() {
    let mut table = Table::new(&pack(&[4, 4, 4])).unwrap();
    assert!(table.column::<f32>("param", &pack(&[0x1000, 0x2000]), true).is_err());
    assert!(table.column::<f32>("param", &pack(&[0x1000, 0x2000, 0x3000, 0x4000]), true).is_err());
    assert!(table.steps(Dtype::F32, &pack(&[])).is_err());
    assert!(table.check_count("flags", 2).is_err());
    assert!(table.check_count("flags", 3).is_ok());
    assert!(table.column::<f32>("param", &pack(&[0x1000, 0x2000, 0x3000]), true).is_ok());
    assert!(table.check().is_ok());
    // No tensors at all: only empty columns fit.
    let mut empty = Table::new(&[]).unwrap();
    assert!(empty.column::<f64>("param", &[], true).is_ok());
    assert!(empty.column::<f64>("param", &pack(&[8]), true).is_err());
    assert!(empty.check().is_ok());
}

#[test]
fn slices_need_a_passed_check_and_a_written_column() {
    let mut data = [1.0f32; 4];
    let mut table = Table::new(&pack(&[4])).unwrap();
    let col = table.column::<f32>("param", &pack(&[data.as_mut_ptr() as u64]), false).unwrap();
    // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
    let unchecked = std::panic::catch_unwind(|| unsafe { table.read(col, 0).len() });
    assert!(unchecked.is_err(), "sliced before check");
    table.check().unwrap();
    // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
    let read_only = std::panic::catch_unwind(|| unsafe { table.written(col, 0).len() });
    assert!(read_only.is_err(), "a read-only column sliced as written");
    // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
    assert_eq!(unsafe { table.read(col, 0) }, &[1.0; 4]);
    // A column added after the check needs another check.
    let col2 = table.column::<f32>("param", &pack(&[data.as_mut_ptr() as u64]), false).unwrap();
    // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
    assert!(std::panic::catch_unwind(|| unsafe { table.read(col2, 0).len() }).is_err());
    // SAFETY: the buffer's memory is live and otherwise unused; the slice is refused or made, never aliased.
    let out_of_range = std::panic::catch_unwind(|| unsafe { table.read(col, 1).len() });
    assert!(out_of_range.is_err());
}

#[test]
fn dtype_names() {
    assert_eq!(Dtype::parse("float32"), Ok(Dtype::F32));
    assert_eq!(Dtype::parse("float64"), Ok(Dtype::F64));
    assert_eq!(Dtype::parse("bfloat16"), Ok(Dtype::BF16));
    assert_eq!(Dtype::parse("float16"), Ok(Dtype::F16));
    for bad in ["", "int32", "complex64", "Float32"] {
        assert!(matches!(Dtype::parse(bad), Err(Error::InvalidArgument(_))), "{bad}");
    }
}
