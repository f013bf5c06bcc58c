//! An allocator that counts what it allocates, so the benchmark can measure (not assume) what a
//! step allocates on the Rust side. The binding installs it as its `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting bytes and allocations (a `realloc` counts as one allocation of
/// its new size).
pub struct CountingAllocator;

static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// (bytes, allocations) counted since the process started.
pub fn counters() -> (u64, u64) {
    (ALLOCATED_BYTES.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed))
}

fn count(bytes: usize) {
    ALLOCATED_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
}

// SAFETY: every method forwards its arguments to `System` unchanged and returns its result
// unchanged, so `System`'s guarantees (alignment, size, preserved contents on realloc) carry
// over; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is `System.alloc_zeroed`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` meets the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over-aligned blocks grown and shrunk through `realloc` keep their alignment and contents
    /// (`System.realloc` must be handed the old layout, whose alignment it honours), and are
    /// counted.
    #[test]
    fn realloc_keeps_alignment_and_contents_and_is_counted() {
        let a = CountingAllocator;
        for align in [1, 8, 64, 4096] {
            for (from, to) in [(1, 10_000), (10_000, 3), (4096, 4096), (100, 1 << 20)] {
                let layout = Layout::from_size_align(from, align).unwrap();
                let before = counters();
                // SAFETY: a non-zero-sized layout; the block is freed below with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                    for i in 0..from {
                        p.add(i).write(i as u8);
                    }
                    let q = a.realloc(p, layout, to);
                    assert!(!q.is_null() && (q as usize).is_multiple_of(align), "align {align}: {from} -> {to}");
                    for i in 0..from.min(to) {
                        assert_eq!(q.add(i).read(), i as u8);
                    }
                    a.dealloc(q, Layout::from_size_align(to, align).unwrap());
                }
                let after = counters();
                // Other tests may allocate meanwhile: at least ours were counted.
                assert!(after.0 >= before.0 + (from + to) as u64 && after.1 >= before.1 + 2);
            }
        }
        let zeroed = Layout::from_size_align(256, 128).unwrap();
        // SAFETY: as above.
        unsafe {
            let p = a.alloc_zeroed(zeroed);
            assert!((p as usize).is_multiple_of(128) && (0..256).all(|i| p.add(i).read() == 0));
            a.dealloc(p, zeroed);
        }
    }
}
