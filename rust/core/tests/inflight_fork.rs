//! `inflight::reset_after_fork` (its own test binary: it replaces the process-wide registry,
//! which the other tests' threads share).

use std::sync::mpsc;
use std::time::Duration;

use rsoptim_core::inflight::{in_flight, reserve, reset_after_fork};
use rsoptim_core::raw::Buffer;

#[test]
fn after_a_fork_reservations_of_threads_that_are_gone_do_not_block() {
    let buffer = [Buffer::of::<f32>("param", 0, 0x10_0000, 1024, true)];
    // A reservation the child would inherit from a thread that does not exist there.
    let inherited = reserve(&buffer);
    assert_eq!(in_flight(), 1);
    reset_after_fork();
    assert_eq!(in_flight(), 0);
    let (done, finished) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _claim = reserve(&buffer);
        done.send(()).unwrap();
    });
    finished.recv_timeout(Duration::from_secs(10)).expect("a reservation of the old registry blocked the new one");
    thread.join().unwrap(); // its reservation is released when it ends
                            // Releasing the inherited reservation touches only the old registry.
    drop(inherited);
    assert_eq!(in_flight(), 0);
}
