//! Throughput of every kernel on every SIMD path this CPU has, at 4K, 256K and 4M elements (f32).
//!
//! `Throughput::Bytes` is the memory each step moves per element, reads plus writes, so criterion
//! reports GB/s that can be set against the machine's memory bandwidth:
//!
//! | kernel                        | reads                  | writes            | bytes/elem |
//! |-------------------------------|------------------------|-------------------|-----------:|
//! | adam, adamw                   | p, g, m, v             | p, m, v           | 28 |
//! | adam amsgrad                  | p, g, m, v, vmax       | p, m, v, vmax     | 36 |
//! | sgd momentum                  | p, g, buf              | p, buf            | 20 |
//! | rmsprop                       | p, g, sq               | p, sq             | 20 |
//! | rmsprop centered + momentum   | p, g, sq, ga, buf      | p, sq, ga, buf    | 36 |
//! | tensor_norms (p = 2)          | x                      |                   |  4 |
//! | scale_in_place                | x                      | x                 |  8 |
//!
//! Half precision (`adam_half`, 4M only): Adam with bfloat16/float16 params and state (14
//! bytes/elem), with float32 state (22), with a float32 master copy (30: the master is read and
//! written besides the param), and with stochastic rounding (14).
//!
//! 8-bit states (`adam8bit_f32`, `adam8bit_bf16`): AdamW with float32 (bfloat16) params and
//! block-wise 8-bit moments (16 (10) bytes/elem: p, g read; p written; a byte of each moment read
//! and written; the block scales are 0.03 more).
//!
//! Runs on one thread by default, so the paths compare like for like; set
//! `RSOPTIM_BENCH_THREADS=n` for a pool of `n`. Samples are few and short so the whole run stays
//! within a few minutes on a small machine: `cargo bench -p rsoptim-core`, or pick a group,
//! e.g. `cargo bench -p rsoptim-core -- 'adam_f32/.*/4M'`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use half::{bf16, f16};
use rsoptim_core::{
    adam8bit_step, adam_step, quant_blocks, rmsprop_step, scale_in_place, sgd_step, tensor_norms, Adam8bitTensor,
    AdamHyper, AdamTensor, Element, Executor, NormType, RmspropHyper, RmspropTensor, Rounding, SgdHyper, SgdTensor,
    SimdLevel, StepCount,
};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4K"), (256 << 10, "256K"), (4 << 20, "4M")];

fn threads() -> usize {
    std::env::var("RSOPTIM_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

/// One executor per available SIMD path, named after it.
fn executors() -> Vec<(String, Executor)> {
    let threads = threads();
    SimdLevel::available()
        .into_iter()
        .map(|level| {
            let name = if threads == 1 { level.name().to_string() } else { format!("{level}-x{threads}") };
            (name, Executor::new(threads, level).expect("thread pool"))
        })
        .collect()
}

/// Deterministic values in [-1, 1) away from zero (no subnormals in the state, whatever the
/// number of iterations).
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let u = (x >> 8) as f32 / (1u32 << 24) as f32; // [0, 1)
            let v = 0.1 + 0.9 * u;
            if x & 1 == 0 {
                v
            } else {
                -v
            }
        })
        .collect()
}

fn new_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    // Flat sampling: the 4M cases take milliseconds per iteration, and linear sampling would
    // need 55 of them per run.
    g.sampling_mode(SamplingMode::Flat);
    g
}

fn bench_adam(c: &mut Criterion, name: &str, hyper: AdamHyper, bytes_per_elem: u64) {
    let execs = executors();
    let mut group = new_group(c, name);
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * bytes_per_elem));
        let mut p = data(n, 1);
        let g = data(n, 2);
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let mut vmax = hyper.amsgrad.then(|| vec![0.0f32; n]);
        let mut step = 0.0f32;
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                b.iter(|| {
                    let t = AdamTensor {
                        param: black_box(&mut p[..]),
                        grad: black_box(&g[..]),
                        exp_avg: black_box(&mut m[..]),
                        exp_avg_sq: black_box(&mut v[..]),
                        max_exp_avg_sq: black_box(vmax.as_deref_mut()),
                        step: StepCount::F32(&mut step),
                        master_param: None,
                        rounding: Rounding::Nearest,
                    };
                    adam_step(vec![t], black_box(&hyper), exec).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn adam8bit(c: &mut Criterion) {
    bench_adam8bit::<f32>(c, "adam8bit_f32", 16);
    bench_adam8bit::<bf16>(c, "adam8bit_bf16", 10);
}

fn bench_adam8bit<P: Element<Math = f32>>(c: &mut Criterion, name: &str, bytes_per_elem: u64) {
    let hyper = AdamHyper { weight_decay: 1e-2, decoupled_weight_decay: true, ..AdamHyper::default() };
    let execs = executors();
    let mut group = new_group(c, name);
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * bytes_per_elem));
        let mut p: Vec<P> = data(n, 1).into_iter().map(P::store).collect();
        let g: Vec<P> = data(n, 2).into_iter().map(P::store).collect();
        let (mut m, mut v) = (vec![0u8; n], vec![0u8; n]);
        let (mut m_scales, mut v_scales) = (vec![0.0f32; quant_blocks(n)], vec![0.0f32; quant_blocks(n)]);
        let mut step = 0.0f32;
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                b.iter(|| {
                    let t = Adam8bitTensor {
                        param: black_box(&mut p[..]),
                        grad: black_box(&g[..]),
                        exp_avg_codes: black_box(&mut m[..]),
                        exp_avg_sq_codes: black_box(&mut v[..]),
                        exp_avg_scales: black_box(&mut m_scales[..]),
                        exp_avg_sq_scales: black_box(&mut v_scales[..]),
                        step: StepCount::F32(&mut step),
                        master_param: None,
                        rounding: Rounding::Nearest,
                    };
                    adam8bit_step(vec![t], black_box(&hyper), exec).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn adam(c: &mut Criterion) {
    bench_adam(c, "adam_f32", AdamHyper::default(), 28);
    bench_adam(c, "adam_amsgrad_f32", AdamHyper { amsgrad: true, ..AdamHyper::default() }, 36);
    let adamw = AdamHyper { weight_decay: 1e-2, decoupled_weight_decay: true, ..AdamHyper::default() };
    bench_adam(c, "adamw_f32", adamw, 28);
}

fn sgd(c: &mut Criterion) {
    let execs = executors();
    let hyper = SgdHyper { lr: 1e-3, momentum: 0.9, ..SgdHyper::default() };
    let mut group = new_group(c, "sgd_momentum_f32");
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * 20));
        let mut p = data(n, 3);
        let g = data(n, 4);
        let mut buf = data(n, 5);
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                b.iter(|| {
                    let t = SgdTensor {
                        param: black_box(&mut p[..]),
                        grad: black_box(&g[..]),
                        momentum_buffer: Some(black_box(&mut buf[..])),
                        momentum_buffer_is_new: false,
                        master_param: None,
                        rounding: Rounding::Nearest,
                        step: None,
                    };
                    sgd_step(vec![t], black_box(&hyper), exec).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn bench_rmsprop(c: &mut Criterion, name: &str, hyper: RmspropHyper, bytes_per_elem: u64) {
    let execs = executors();
    let mut group = new_group(c, name);
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * bytes_per_elem));
        let mut p = data(n, 6);
        let g = data(n, 7);
        let mut sq = vec![1.0f32; n];
        let mut buf = (hyper.momentum > 0.0).then(|| vec![0.0f32; n]);
        let mut ga = hyper.centered.then(|| vec![0.0f32; n]);
        let mut step = 0.0f32;
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                b.iter(|| {
                    let t = RmspropTensor {
                        param: black_box(&mut p[..]),
                        grad: black_box(&g[..]),
                        square_avg: black_box(&mut sq[..]),
                        momentum_buffer: black_box(buf.as_deref_mut()),
                        grad_avg: black_box(ga.as_deref_mut()),
                        step: StepCount::F32(&mut step),
                        master_param: None,
                        rounding: Rounding::Nearest,
                    };
                    rmsprop_step(vec![t], black_box(&hyper), exec).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn rmsprop(c: &mut Criterion) {
    bench_rmsprop(c, "rmsprop_f32", RmspropHyper::default(), 20);
    let full = RmspropHyper { centered: true, momentum: 0.9, ..RmspropHyper::default() };
    bench_rmsprop(c, "rmsprop_centered_momentum_f32", full, 36);
}

fn norms(c: &mut Criterion) {
    let execs = executors();
    let mut group = new_group(c, "norm2_f32");
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * 4));
        let x = data(n, 8);
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                b.iter(|| black_box(tensor_norms(&[black_box(&x[..])], NormType::Two, exec)))
            });
        }
    }
    group.finish();

    let mut group = new_group(c, "scale_f32");
    for (n, label) in SIZES {
        group.throughput(Throughput::Bytes(n as u64 * 8));
        let mut x = data(n, 9);
        for (path, exec) in &execs {
            group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
                // Factors 2 and 0.5 in turn keep the values (exactly) and the speed the same from
                // one iteration to the next. (A factor of 1 would measure nothing: scale_in_place
                // skips it, x * 1 being x.)
                let mut factor = 0.5f32;
                b.iter(|| {
                    factor = 1.0 / factor;
                    scale_in_place(vec![black_box(&mut x[..])], black_box(factor), exec)
                })
            });
        }
    }
    group.finish();
}

/// One half-precision Adam variant at 4M elements on every path.
fn bench_adam_typed<P: Element<Math = f32>, S: Element<Math = f32>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    master: bool,
    rounding: Rounding,
) {
    let n = 4 << 20;
    // p and g read, p written; m and v read and written; the master read and written.
    let bytes = 3 * std::mem::size_of::<P>() + 4 * std::mem::size_of::<S>() + if master { 8 } else { 0 };
    group.throughput(Throughput::Bytes((n * bytes) as u64));
    let to = |xs: Vec<f32>| xs.into_iter().map(P::store).collect::<Vec<P>>();
    let (mut p, g) = (to(data(n, 1)), to(data(n, 2)));
    let mut m: Vec<S> = vec![S::store(0.0); n];
    let mut v: Vec<S> = vec![S::store(0.0); n];
    let mut master_copy = master.then(|| p.iter().map(|x| x.load()).collect::<Vec<f32>>());
    let mut step = 0.0f32;
    for (path, exec) in &executors() {
        group.bench_function(BenchmarkId::new(path.as_str(), label), |b| {
            b.iter(|| {
                let t = AdamTensor::<P, S> {
                    param: black_box(&mut p[..]),
                    grad: black_box(&g[..]),
                    exp_avg: black_box(&mut m[..]),
                    exp_avg_sq: black_box(&mut v[..]),
                    max_exp_avg_sq: None,
                    step: StepCount::F32(&mut step),
                    master_param: master_copy.as_deref_mut(),
                    rounding,
                };
                adam_step(vec![t], &AdamHyper::default(), exec).unwrap();
            })
        });
    }
}

fn adam_half(c: &mut Criterion) {
    let mut group = new_group(c, "adam_half");
    let sr = Rounding::Stochastic { seed: 1, stream: 0 };
    bench_adam_typed::<bf16, bf16>(&mut group, "bf16/4M", false, Rounding::Nearest);
    bench_adam_typed::<f16, f16>(&mut group, "f16/4M", false, Rounding::Nearest);
    bench_adam_typed::<bf16, f32>(&mut group, "bf16-f32-state/4M", false, Rounding::Nearest);
    bench_adam_typed::<bf16, bf16>(&mut group, "bf16-master/4M", true, Rounding::Nearest);
    bench_adam_typed::<bf16, bf16>(&mut group, "bf16-stochastic/4M", false, sr);
    bench_adam_typed::<f16, f16>(&mut group, "f16-stochastic/4M", false, sr);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
}

criterion_group! {
    name = benches;
    config = config();
    targets = adam, adam8bit, adam_half, sgd, rmsprop, norms
}
criterion_main!(benches);
