//! Serialising kernel calls that touch the same memory.
//!
//! `raw::check_buffers` makes the buffers of *one* call safe to slice; it cannot see another
//! call. Two Python threads may step optimizers over the same params at once (the GIL is
//! released around each kernel), and their `&mut` slices would then alias: a data race. So each
//! call registers its buffers here before it slices them, and waits while a call in flight
//! shares memory with it where at least one side writes. Calls over separate memory, and calls
//! that only read the same memory, run at the same time.
//!
//! A call that reserves twice on one thread while holding an overlapping reservation waits
//! forever: reserve once per call, around the whole kernel.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::raw::Buffer;

/// The memory of one call: the byte ranges it writes, and all the byte ranges it touches, each
/// sorted and merged into disjoint `[start, end)` intervals.
#[derive(Debug, Default)]
struct Footprint {
    written: Vec<(usize, usize)>,
    touched: Vec<(usize, usize)>,
}

impl Footprint {
    fn of<'a>(buffers: impl IntoIterator<Item = &'a Buffer>) -> Self {
        // Saturating ends: an unchecked buffer past the address space still reserves up to the
        // top of it, and nothing here can overflow or panic.
        let mut spans: Vec<(usize, usize, bool)> = buffers
            .into_iter()
            .filter(|b| b.len > 0 && b.elem_size > 0)
            .map(|b| (b.addr, b.addr.saturating_add(b.len.saturating_mul(b.elem_size)), b.written))
            .collect();
        // Buffers given in address order (`Table::reserve`) make this sort a linear pass.
        spans.sort_unstable_by_key(|s| s.0);
        let written = merge(spans.iter().filter(|s| s.2).map(|s| (s.0, s.1)));
        let touched = merge(spans.iter().map(|s| (s.0, s.1)));
        Self { written, touched }
    }

    /// Whether the two calls must not run at the same time.
    fn conflicts_with(&self, other: &Self) -> bool {
        intersect(&self.written, &other.touched) || intersect(&self.touched, &other.written)
    }
}

/// Merges intervals sorted by start into disjoint ones (touching intervals share no byte and
/// may stay apart).
fn merge(sorted: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether two lists of disjoint sorted intervals share a byte: one merge-like pass.
fn intersect(a: &[(usize, usize)], b: &[(usize, usize)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].0 < b[j].1 && b[j].0 < a[i].1 {
            return true;
        }
        // The interval that ends first cannot meet anything further along the other list.
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

struct Registry {
    next_id: u64,
    in_flight: Vec<(u64, Footprint)>,
    /// How many calls wait for a release: a release with none skips `notify_all`, which is a
    /// system call even when nobody waits (about a fifth of a tiny step's time in a profile).
    waiting: usize,
}

/// The registry and the condition its waiters wait on.
struct Shared {
    registry: Mutex<Registry>,
    released: Condvar,
}

impl Shared {
    fn leak_new() -> *mut Shared {
        Box::into_raw(Box::new(Shared {
            registry: Mutex::new(Registry { next_id: 0, in_flight: Vec::new(), waiting: 0 }),
            released: Condvar::new(),
        }))
    }
}

/// The registry in use. A new one is made (and the old one leaked) in a child after `fork`: the
/// child has none of the threads that held the old one's reservations or its lock.
static CURRENT: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

fn shared() -> &'static Shared {
    let mut current = CURRENT.load(Ordering::Acquire);
    if current.is_null() {
        let fresh = Shared::leak_new();
        current = match CURRENT.compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => fresh,
            Err(installed) => {
                // SAFETY: `fresh` came from `Box::into_raw` just above and was never shared.
                drop(unsafe { Box::from_raw(fresh) });
                installed
            }
        };
    }
    // SAFETY: every pointer stored in CURRENT comes from `Shared::leak_new` (Box::into_raw) and
    // is never freed, so it is valid for the rest of the process.
    unsafe { &*current }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Registry> {
    // Nothing panics while the lock is held, but a poisoned registry is still consistent.
    shared.registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// For a child process right after `fork()`: starts a new, empty registry. The old one may be
/// locked, or hold reservations, by threads that do not exist in the child; it is leaked.
pub fn reset_after_fork() {
    CURRENT.store(Shared::leak_new(), Ordering::Release);
}

/// A call's claim on its buffers; dropping it (also while unwinding from a panic) lets the
/// calls waiting for them go on.
#[must_use = "the buffers are only reserved while the Reservation lives"]
#[derive(Debug)]
pub struct Reservation {
    id: u64,
    shared: &'static Shared,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

/// Blocks while any call in flight shares memory with `buffers` where either side writes it,
/// then registers them until the returned `Reservation` is dropped. Empty buffers are ignored.
pub fn reserve(buffers: &[Buffer]) -> Reservation {
    reserve_each(buffers)
}

/// `reserve` for buffers from an iterator: given in address order (as `Table::reserve` gives
/// them), they are reserved faster; any order reserves the same memory.
pub(crate) fn reserve_each<'a>(buffers: impl IntoIterator<Item = &'a Buffer>) -> Reservation {
    let footprint = Footprint::of(buffers);
    let shared = shared();
    let mut reg = lock(shared);
    while reg.in_flight.iter().any(|(_, other)| footprint.conflicts_with(other)) {
        // Counted under the lock before `wait` releases it: a release that takes the lock after
        // this sees the count and notifies.
        reg.waiting += 1;
        reg = shared.released.wait(reg).unwrap_or_else(|e| e.into_inner());
        reg.waiting -= 1;
    }
    let id = reg.next_id;
    reg.next_id += 1;
    reg.in_flight.push((id, footprint));
    Reservation { id, shared }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reg = lock(self.shared);
        if let Some(at) = reg.in_flight.iter().position(|(id, _)| *id == self.id) {
            reg.in_flight.swap_remove(at);
        }
        let anyone_waits = reg.waiting > 0;
        drop(reg);
        if anyone_waits {
            self.shared.released.notify_all();
        }
    }
}

/// How many calls hold a reservation now (for tests).
pub fn in_flight() -> usize {
    lock(shared()).in_flight.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(addr: usize, len: usize, written: bool) -> Buffer {
        Buffer::of::<f32>("x", 0, addr, len, written)
    }

    #[test]
    fn footprints_conflict_only_where_a_write_meets_memory() {
        let f = |bs: &[Buffer]| Footprint::of(bs);
        let w = f(&[b(100, 4, true)]);
        assert!(w.conflicts_with(&f(&[b(100, 4, false)])));
        assert!(w.conflicts_with(&f(&[b(112, 4, false)])), "the last element");
        assert!(!w.conflicts_with(&f(&[b(116, 4, true)])), "adjacent");
        assert!(!w.conflicts_with(&f(&[b(84, 4, true)])), "adjacent before");
        assert!(!f(&[b(100, 4, false)]).conflicts_with(&f(&[b(100, 4, false)])), "read/read");
        assert!(!w.conflicts_with(&f(&[b(100, 0, true)])), "empty");
        // Inside a long read-only buffer of the other call, past other intervals.
        let many = f(&[b(0x1000, 1000, false), b(0x2000, 1, true), b(0x3000, 1, true)]);
        assert!(many.conflicts_with(&f(&[b(0x0800, 1, true), b(0x1400, 1, true)])));
        assert!(!many.conflicts_with(&f(&[b(0x0800, 1, true), b(0x1000, 1000, false), b(0x2004, 2, true)])));
        // Addresses at the top of the address space do not overflow.
        assert!(f(&[b(usize::MAX - 3, 4, true)]).conflicts_with(&f(&[b(usize::MAX - 1, usize::MAX, false)])));
    }

    #[test]
    fn merge_and_intersect_match_brute_force() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as usize
        };
        for _ in 0..2000 {
            let make = |next: &mut dyn FnMut(u64) -> usize| -> Vec<Buffer> {
                let k = next(6);
                (0..k).map(|_| b(next(64) * 4, next(6), next(3) == 0)).collect()
            };
            let (x, y) = (make(&mut next), make(&mut next));
            let brute = x.iter().any(|p| {
                y.iter().any(|q| {
                    let (pe, qe) = (p.addr + 4 * p.len, q.addr + 4 * q.len);
                    p.len > 0 && q.len > 0 && p.addr < qe && q.addr < pe && (p.written || q.written)
                })
            });
            assert_eq!(Footprint::of(&x).conflicts_with(&Footprint::of(&y)), brute, "{x:?} {y:?}");
        }
    }
}
