//! The OpenMP backend: steps run as parallel regions of an OpenMP runtime already in the process
//! give the same bits as rsoptim's own pool, and a panic inside a region comes back as a panic
//! rather than unwinding into C. These tests load the system's libgomp first, as torch would
//! have; where it is missing they say so and pass.
#![cfg(unix)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rsoptim_core::openmp::OpenMp;
use rsoptim_core::{
    adam_step, tensor_norms, AdamHyper, AdamTensor, Executor, NormType, Rounding, SimdLevel, StepCount,
};

const LIBGOMP: &str = "libgomp.so.1";

fn runtime() -> Option<OpenMp> {
    static LOADED: OnceLock<Option<libloading::Library>> = OnceLock::new();
    // SAFETY: loading libgomp runs its initialisers, which only set up the OpenMP runtime.
    let loaded = LOADED.get_or_init(|| unsafe { libloading::Library::new(LIBGOMP) }.ok());
    if loaded.is_none() {
        eprintln!("{LIBGOMP} is not installed: skipping the OpenMP backend tests");
        return None;
    }
    Some(OpenMp::already_loaded(LIBGOMP).expect("libgomp is loaded, so it must be found"))
}

#[test]
fn a_runtime_that_is_not_loaded_is_not_used() {
    assert!(OpenMp::already_loaded("/nonexistent/libgomp.so.1").is_none());
}

fn adam_result(exec: &Executor, sizes: &[usize]) -> Vec<Vec<u32>> {
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|i| (i as f32 * 0.37).sin()).collect()).collect();
    let grads: Vec<Vec<f32>> =
        sizes.iter().map(|&n| (0..n).map(|i| (i as f32 * 0.11).cos() * 1e-2).collect()).collect();
    let mut m: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut v: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut steps = vec![0.0f32; sizes.len()];
    let hyper = AdamHyper { weight_decay: 0.1, ..AdamHyper::default() };
    for _ in 0..3 {
        let tensors: Vec<AdamTensor<'_, f32>> = params
            .iter_mut()
            .zip(&grads)
            .zip(m.iter_mut().zip(v.iter_mut()))
            .zip(steps.iter_mut())
            .map(|(((p, g), (m, v)), s)| AdamTensor {
                param: p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                max_exp_avg_sq: None,
                step: StepCount::F32(s),
                master_param: None,
                rounding: Rounding::Nearest,
            })
            .collect();
        adam_step(tensors, &hyper, exec).expect("valid buffers");
    }
    params.iter().map(|p| p.iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn steps_on_openmp_threads_match_the_pool_bit_for_bit() {
    let Some(openmp) = runtime() else { return };
    let sizes = [100_000, 1, 17, 70_000, 4096, 0, 300_001];
    for threads in [2, 3] {
        let pool = Executor::new(threads, SimdLevel::best()).unwrap().with_parallel_min_elements(0);
        let omp = pool.with_openmp(Some(openmp.clone()));
        assert_eq!(adam_result(&omp, &sizes), adam_result(&pool, &sizes), "{threads} threads");
        let data: Vec<Vec<f64>> = sizes.iter().map(|&n| (0..n).map(|i| (i as f64).sqrt()).collect()).collect();
        let slices: Vec<&[f64]> = data.iter().map(|d| d.as_slice()).collect();
        let on_pool: Vec<u64> = tensor_norms(&slices, NormType::Two, &pool).iter().map(|x| x.to_bits()).collect();
        let on_omp: Vec<u64> = tensor_norms(&slices, NormType::Two, &omp).iter().map(|x| x.to_bits()).collect();
        assert_eq!(on_omp, on_pool);
    }
}

#[test]
fn every_member_of_the_team_runs_the_body() {
    let Some(openmp) = runtime() else { return };
    let ran = AtomicUsize::new(0);
    openmp.run(3, &|| {
        ran.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(ran.load(Ordering::Relaxed), 3);
}

#[test]
fn a_panic_inside_a_region_comes_back_as_a_panic() {
    let Some(openmp) = runtime() else { return };
    let calls = AtomicUsize::new(0);
    let outcome = std::panic::catch_unwind(|| {
        openmp.run(2, &|| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("boom in a team member");
            }
        })
    });
    let panic = outcome.expect_err("the panic must reach the caller");
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom in a team member"));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the other member still ran");
    // The runtime is still usable afterwards.
    let ran = AtomicUsize::new(0);
    openmp.run(2, &|| {
        ran.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(ran.load(Ordering::Relaxed), 2);
}
