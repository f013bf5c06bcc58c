//! `inflight::reserve` across threads: calls that write shared memory never run at the same time,
//! independent calls and calls that only read shared memory do, and a panic releases the claim.
//!
//! The registry is process-wide and the tests of this file run in parallel, so each test uses
//! its own address range (the addresses are never dereferenced).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use rsoptim_core::inflight::reserve;
use rsoptim_core::raw::Buffer;

fn buf(addr: usize, len: usize, written: bool) -> Buffer {
    Buffer::of::<f32>("x", 0, addr, len, written)
}

/// Runs `calls[k]` on thread k, all released at once; each, holding its reservation, records
/// how many calls are inside and waits up to `linger` for all of them to be inside together.
/// Returns the largest number of calls seen inside at once.
fn run_together(calls: Vec<Vec<Buffer>>, linger: Duration) -> usize {
    let inside = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    let start = Barrier::new(calls.len());
    let n = calls.len();
    thread::scope(|s| {
        for buffers in &calls {
            s.spawn(|| {
                start.wait();
                let _claim = reserve(buffers);
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let until = Instant::now() + linger;
                // Once all were inside together, none waits longer (the first to leave would
                // keep the others waiting out their whole linger).
                while most.load(Ordering::SeqCst) < n && Instant::now() < until {
                    most.fetch_max(inside.load(Ordering::SeqCst), Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(1));
                }
                inside.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    most.load(Ordering::SeqCst)
}

#[test]
fn calls_writing_shared_memory_never_run_together() {
    let a = 0x10_0000;
    let cases = [
        // The same param stepped by two threads.
        vec![vec![buf(a, 64, true), buf(a + 0x1000, 64, false)], vec![buf(a, 64, true), buf(a + 0x2000, 64, false)]],
        // One writes what the other reads (a grad that is another optimizer's param).
        vec![vec![buf(a, 64, true)], vec![buf(a + 0x3000, 4, true), buf(a + 252, 1, false)]],
        // Three threads, each pair sharing memory somewhere among separate buffers.
        vec![
            vec![buf(a + 0x4000, 8, false), buf(a + 0x5000, 16, true)],
            vec![buf(a + 0x5020, 16, true), buf(a + 0x6000, 8, true)],
            vec![buf(a + 0x6010, 1, false), buf(a + 0x7000, 1, true), buf(a + 0x4004, 1, true)],
        ],
    ];
    for calls in cases {
        for _ in 0..5 {
            assert_eq!(run_together(calls.clone(), Duration::from_millis(20)), 1, "{calls:?}");
        }
    }
}

#[test]
fn independent_calls_run_together() {
    let a = 0x20_0000;
    // Adjacent buffers share no byte; empty buffers claim nothing, wherever they point.
    let calls = vec![
        vec![buf(a, 64, true), buf(a + 0x1000, 64, false), buf(a + 0x100, 0, true)],
        vec![buf(a + 256, 64, true), buf(a + 0x2000, 64, false), buf(0, 0, true)],
        vec![buf(a + 512, 64, true), buf(a + 0x100, 0, true)],
    ];
    assert_eq!(run_together(calls, Duration::from_secs(10)), 3);
}

#[test]
fn calls_only_reading_shared_memory_run_together() {
    let a = 0x30_0000;
    let calls = vec![
        vec![buf(a, 1024, false), buf(a + 0x1000, 4, true)],
        vec![buf(a + 64, 16, false), buf(a + 0x2000, 4, true)],
    ];
    assert_eq!(run_together(calls, Duration::from_secs(10)), 2);
}

#[test]
fn a_waiting_call_runs_once_the_first_is_done() {
    let a = 0x40_0000;
    let first = reserve(&[buf(a, 16, true)]);
    let entered = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let _claim = reserve(&[buf(a + 8, 1, false)]);
            entered.store(true, Ordering::SeqCst);
        });
        thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "entered while the writer was in flight");
        drop(first);
    });
    assert!(entered.load(Ordering::SeqCst));
}

#[test]
fn a_panic_inside_the_reservation_releases_it() {
    let a = 0x50_0000;
    let buffers = [buf(a, 16, true)];
    let outcome = thread::spawn(move || {
        let _claim = reserve(&buffers);
        panic!("kernel panicked");
    })
    .join();
    assert!(outcome.is_err());
    // Also when caught on the same thread, as the binding does with catch_unwind.
    let caught = std::panic::catch_unwind(|| {
        let _claim = reserve(&buffers);
        panic!("kernel panicked");
    });
    assert!(caught.is_err());
    // Were either claim still held, this would block forever; give it a deadline instead.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _claim = reserve(&buffers);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("the panicked calls released their buffers");
}

#[test]
fn a_tables_reservation_covers_every_buffer_whatever_its_columns_order() {
    use rsoptim_core::table::Table;
    let a = 0x90_0000usize;
    let words = |w: &[usize]| w.iter().flat_map(|&x| (x as u64).to_ne_bytes()).collect::<Vec<u8>>();
    let mut table = Table::new(&words(&[4, 4, 4])).unwrap();
    // Columns in falling address order, each column falling too: the reservation must not
    // depend on the order the buffers come in.
    table.column::<f32>("param", &words(&[a + 0x6000, a + 0x5000, a + 0x4000]), true).unwrap();
    table.column::<f32>("grad", &words(&[a + 0x3000, a + 0x2000, a + 0x1000]), false).unwrap();
    table.check().unwrap();
    // A write into any of its buffers, and a read of any it writes, waits for the table's claim.
    for (addr, written) in
        [(a + 0x1000, true), (a + 0x2008, true), (a + 0x300c, true), (a + 0x4000, false), (a + 0x600c, false)]
    {
        let claim = table.reserve();
        let got = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| {
                let _other = reserve(&[buf(addr, 1, written)]);
                got.store(true, Ordering::SeqCst);
            });
            thread::sleep(Duration::from_millis(50));
            assert!(!got.load(Ordering::SeqCst), "{addr:#x} (written: {written}) was reserved beside the table");
            drop(claim); // (the scope waits for the other thread, which waits for this)
        });
        assert!(got.load(Ordering::SeqCst));
    }
    // Reading what the table only reads does not wait.
    let _claim = table.reserve();
    let _other = reserve(&[buf(a + 0x2000, 4, false)]);
}
