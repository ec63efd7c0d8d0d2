//! AdamW over f32 parameters, with its state (first and second moments, step count)
//! owned by Rust, for the expert-LoRA weights (which are Rust memory already).
//!
//! The update is `torch.optim.AdamW`'s (`_single_tensor_adam` with decoupled weight decay),
//! operation for operation in f32 with the scalars rounded as torch rounds them, so the
//! two agree to fp32 rounding (bit for bit where torch's CPU kernels round alike):
//!
//! ```text
//! step += 1
//! p  = p * f32(1 - lr·wd)                       (only when wd != 0)
//! m  = lerp(m, g, f32(1 - β1))                  (torch's lerp: m + w·(g - m), fused)
//! v  = fma(f32(1 - β2) * g, g, v * f32(β2))     (torch's mul_ then addcmul_, fused)
//! d  = sqrt(v) / f32(sqrt(1 - β2^step)) + f32(eps)
//! p  = p + (f32(-lr / (1 - β1^step)) * m) / d
//! ```
//!
//! One call updates any number of tensors in one parallel region of the worker pool,
//! chunk by chunk; every element is computed by one task in a fixed order, so results do
//! not depend on the thread count.

use crate::buffer::{Buffer, SendPtr};
use crate::error::{KtrsError, Result};
use crate::pool::ThreadPool;
use std::sync::{Arc, Mutex};

/// Elements per task: 64 KiB per stream (p, g, m, v), small enough to balance 16 threads
/// over one LoRA matrix, large enough that the task counter is noise.
const CHUNK: usize = 16 * 1024;

/// f32 holds every step count up to 2^24 exactly (torch keeps `step` as an f32 tensor).
const MAX_STEP: f32 = 16_777_216.0;

/// Hyperparameters of one tensor's update (torch's param-group keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWHyper {
    /// torch's own range checks, so both optimizers refuse the same settings.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, arg: &str, want: &str, got: f64| {
            if ok {
                Ok(())
            } else {
                Err(KtrsError::invalid(arg, want, got))
            }
        };
        check(
            self.lr >= 0.0 && self.lr.is_finite(),
            "lr",
            "a finite value >= 0",
            self.lr,
        )?;
        check(
            self.eps >= 0.0 && self.eps.is_finite(),
            "eps",
            "a finite value >= 0",
            self.eps,
        )?;
        check(
            (0.0..1.0).contains(&self.beta1),
            "betas[0]",
            "a value in [0, 1)",
            self.beta1,
        )?;
        check(
            (0.0..1.0).contains(&self.beta2),
            "betas[1]",
            "a value in [0, 1)",
            self.beta2,
        )?;
        check(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "weight_decay",
            "a finite value >= 0",
            self.weight_decay,
        )
    }
}

/// One tensor's optimizer state. The buffers are `Arc`s so Python can hold zero-copy
/// views of them (the optimizer's `state_dict` is made of those views).
pub struct AdamWState {
    exp_avg: Arc<Buffer<f32>>,
    exp_avg_sq: Arc<Buffer<f32>>,
    /// One f32, like torch's `state["step"]`.
    step: Arc<Buffer<f32>>,
}

/// Serialises updates and loads: the state buffers have no lock of their own, and two
/// Python threads stepping the same state would race.
static STEP_LOCK: Mutex<()> = Mutex::new(());

impl AdamWState {
    /// Zero moments and step 0 for a tensor of `len` elements.
    pub fn new(len: usize) -> AdamWState {
        AdamWState {
            exp_avg: Arc::new(Buffer::zeroed(len)),
            exp_avg_sq: Arc::new(Buffer::zeroed(len)),
            step: Arc::new(Buffer::zeroed(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.exp_avg.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn exp_avg(&self) -> &Arc<Buffer<f32>> {
        &self.exp_avg
    }

    pub fn exp_avg_sq(&self) -> &Arc<Buffer<f32>> {
        &self.exp_avg_sq
    }

    pub fn step_buffer(&self) -> &Arc<Buffer<f32>> {
        &self.step
    }

    pub fn step(&self) -> f32 {
        self.step.as_slice()[0]
    }

    /// Replaces the state (a checkpoint being restored).
    pub fn load(&self, exp_avg: &[f32], exp_avg_sq: &[f32], step: f64) -> Result<()> {
        crate::error::check_len("exp_avg", exp_avg.len(), self.len())?;
        crate::error::check_len("exp_avg_sq", exp_avg_sq.len(), self.len())?;
        if !(step >= 0.0 && step <= MAX_STEP as f64 && step.fract() == 0.0) {
            return Err(KtrsError::invalid(
                "step",
                "a whole number in [0, 2^24]",
                step,
            ));
        }
        let _g = STEP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: STEP_LOCK excludes `adamw_step`, the only other Rust writer; the
        // sources are caller slices, which cannot be these Rust-owned buffers mutably.
        unsafe {
            self.exp_avg
                .as_mut_slice_unchecked()
                .copy_from_slice(exp_avg);
            self.exp_avg_sq
                .as_mut_slice_unchecked()
                .copy_from_slice(exp_avg_sq);
            self.step.as_mut_slice_unchecked()[0] = step as f32;
        }
        Ok(())
    }
}

/// One tensor to update: its weights (written in place), gradient and state.
pub struct AdamWUpdate<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub state: &'a AdamWState,
    pub hyper: AdamWHyper,
}

/// The per-tensor scalars of one step, rounded to f32 where torch rounds them.
#[derive(Clone, Copy)]
struct Coeffs {
    decay: Option<f32>,
    lerp_w: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Coeffs {
    fn new(h: &AdamWHyper, step: f64) -> Coeffs {
        // Python floats in torch: every scalar below is a double until the kernel casts it.
        let bc1 = 1.0 - h.beta1.powf(step);
        let bc2 = 1.0 - h.beta2.powf(step);
        Coeffs {
            decay: (h.weight_decay != 0.0).then_some((1.0 - h.lr * h.weight_decay) as f32),
            lerp_w: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            // torch writes `bias_correction2 ** 0.5`: pow, not sqrt (they may round apart).
            bc2_sqrt: bc2.powf(0.5) as f32,
            eps: h.eps as f32,
            neg_step_size: (-(h.lr / bc1)) as f32,
        }
    }
}

/// `a·b + c`, fused where the caller compiled for FMA (torch's vectorised CPU kernels
/// fuse lerp and addcmul: matched bit for bit on AVX-512); separate otherwise, since a
/// software fma would cost more than the whole update.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn update_chunk<const FMA: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: Coeffs,
) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    // `x * 1.0 == x` exactly, so no weight decay needs no separate loop.
    let decay = c.decay.unwrap_or(1.0);
    // torch's lerp: `w < 0.5 ? m + w·(g - m) : g + (w - 1)·(g - m)`, decided once here.
    let small = c.lerp_w.abs() < 0.5;
    let coeff = if small { c.lerp_w } else { c.lerp_w - 1.0 };
    for i in 0..n {
        let gi = g[i];
        let base = if small { m[i] } else { gi };
        let mi = madd::<FMA>(coeff, gi - m[i], base);
        let vi = madd::<FMA>(c.one_minus_beta2 * gi, gi, v[i] * c.beta2);
        let d = vi.sqrt() / c.bc2_sqrt + c.eps;
        p[i] = p[i] * decay + (c.neg_step_size * mi) / d;
        m[i] = mi;
        v[i] = vi;
    }
}

/// The AVX2+FMA build of the same loop (8 lanes, fused lerp like torch's).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_chunk_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coeffs) {
    update_chunk::<true>(p, g, m, v, c)
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::env::var("KTRS_ISA").map_or(true, |v| v != "scalar")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn run_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coeffs, fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is true only when the CPU reported AVX2 and FMA.
        return unsafe { update_chunk_avx2(p, g, m, v, c) };
    }
    let _ = fast;
    update_chunk::<false>(p, g, m, v, c)
}

/// One AdamW step over every update, in one parallel region of `pool`.
///
/// Checks first (lengths, hyperparameters, each state used once, step range), then
/// counts the step and updates weights and moments in place. Nothing is written if a
/// check fails.
pub fn adamw_step(pool: &ThreadPool, updates: &mut [AdamWUpdate<'_>]) -> Result<()> {
    let _g = STEP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut seen = std::collections::HashSet::new();
    for (i, u) in updates.iter().enumerate() {
        u.hyper.validate()?;
        crate::error::check_len(&format!("params[{i}]"), u.param.len(), u.state.len())?;
        crate::error::check_len(&format!("grads[{i}]"), u.grad.len(), u.state.len())?;
        if !seen.insert(Arc::as_ptr(&u.state.exp_avg) as usize) {
            return Err(KtrsError::invalid(
                format!("states[{i}]"),
                "each state at most once per step",
                "a repeated state",
            ));
        }
        if u.state.step() >= MAX_STEP {
            return Err(KtrsError::invalid(
                format!("states[{i}].step"),
                "fewer than 2^24 steps (f32 step count, as in torch)",
                u.state.step(),
            ));
        }
    }
    let mut coeffs = Vec::with_capacity(updates.len());
    for u in updates.iter() {
        // SAFETY: under STEP_LOCK, and states are distinct (checked above).
        let step = unsafe { &mut u.state.step.as_mut_slice_unchecked()[0] };
        *step += 1.0;
        coeffs.push(Coeffs::new(&u.hyper, *step as f64));
    }
    // Tasks: (update, first element), CHUNK elements each.
    let mut tasks = Vec::new();
    for (i, u) in updates.iter().enumerate() {
        tasks.extend((0..u.param.len()).step_by(CHUNK).map(|s| (i, s)));
    }
    struct Ptrs {
        p: SendPtr<f32>,
        g: SendPtr<f32>,
        m: SendPtr<f32>,
        v: SendPtr<f32>,
        len: usize,
    }
    let ptrs: Vec<Ptrs> = updates
        .iter_mut()
        .map(|u| Ptrs {
            p: SendPtr(u.param.as_mut_ptr()),
            g: SendPtr(u.grad.as_ptr() as *mut f32),
            m: SendPtr(u.state.exp_avg.as_ptr()),
            v: SendPtr(u.state.exp_avg_sq.as_ptr()),
            len: u.param.len(),
        })
        .collect();
    let fast = has_avx2_fma();
    pool.run(tasks.len(), |t, _| {
        let (i, s) = tasks[t];
        let q = &ptrs[i];
        let n = CHUNK.min(q.len - s);
        // SAFETY: each (update, chunk) is one task, so the ranges written are disjoint;
        // `param` is a `&mut` (exclusive) and the moments belong to distinct states under
        // STEP_LOCK; all have `len` elements (checked above). The gradient is only read.
        unsafe {
            run_chunk(
                q.p.slice_mut(s, n),
                q.g.slice_mut(s, n),
                q.m.slice_mut(s, n),
                q.v.slice_mut(s, n),
                coeffs[i],
                fast,
            )
        }
    });
    Ok(())
}

/// Two ranges that must not overlap but do (indices into the lists given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Two written ranges, `a < b`.
    Written(usize, usize),
    /// A read range and a written one.
    Read { read: usize, written: usize },
}

/// The first overlap, if any: `written` must be pairwise disjoint and `read` must not
/// overlap any of them (reads may overlap each other). Ranges are byte `[start, end)`;
/// empty ranges overlap nothing.
pub fn find_overlap(written: &[(usize, usize)], read: &[(usize, usize)]) -> Option<Overlap> {
    let mut w: Vec<(usize, usize, usize)> = written
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 < r.1)
        .map(|(i, r)| (r.0, r.1, i))
        .collect();
    w.sort_unstable();
    for pair in w.windows(2) {
        if pair[1].0 < pair[0].1 {
            let (a, b) = (pair[0].2, pair[1].2);
            return Some(Overlap::Written(a.min(b), a.max(b)));
        }
    }
    for (j, &(s, e)) in read.iter().enumerate() {
        if s >= e {
            continue;
        }
        // Written ranges are disjoint and sorted: only the last one starting before `e`
        // can reach past `s`.
        let k = w.partition_point(|r| r.0 < e);
        if k > 0 && w[k - 1].1 > s {
            return Some(Overlap::Read {
                read: j,
                written: w[k - 1].2,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's AdamW written out in f64, one element at a time.
    fn reference(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        h: &AdamWHyper,
        step: f64,
    ) {
        let bc1 = 1.0 - h.beta1.powf(step);
        let bc2 = 1.0 - h.beta2.powf(step);
        for i in 0..p.len() {
            p[i] *= 1.0 - h.lr * h.weight_decay;
            m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
            let m_hat = m[i] / bc1;
            let v_hat = v[i] / bc2;
            // eps is added to sqrt(v)/sqrt(bc2), i.e. to sqrt(v_hat), as torch does.
            p[i] -= h.lr * m_hat / (v_hat.sqrt() + h.eps);
        }
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn hyper(lr: f64, wd: f64) -> AdamWHyper {
        AdamWHyper {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        }
    }

    #[test]
    fn matches_f64_reference_over_steps() {
        // Several tensors of awkward lengths (chunk boundaries, tails), one of them with
        // zero gradients (an expert without tokens), one without weight decay, lr changing.
        let lens = [1usize, 7, CHUNK - 1, CHUNK + 5, 3 * CHUNK + 17, 1000];
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads, false).expect("pool");
            let mut seed = 42u64;
            let mut p32: Vec<Vec<f32>> = lens
                .iter()
                .map(|&n| (0..n).map(|_| lcg(&mut seed) as f32).collect())
                .collect();
            let mut p64: Vec<Vec<f64>> = p32
                .iter()
                .map(|p| p.iter().map(|&x| x as f64).collect())
                .collect();
            let mut m64: Vec<Vec<f64>> = lens.iter().map(|&n| vec![0.0; n]).collect();
            let mut v64 = m64.clone();
            let states: Vec<AdamWState> = lens.iter().map(|&n| AdamWState::new(n)).collect();
            for step in 1..=10 {
                let lr = 1e-2 * (1.0 - 0.05 * step as f64);
                let grads: Vec<Vec<f32>> = lens
                    .iter()
                    .enumerate()
                    .map(|(k, &n)| {
                        (0..n)
                            .map(|_| {
                                if k == 5 {
                                    0.0
                                } else {
                                    (lcg(&mut seed) * 0.1) as f32
                                }
                            })
                            .collect()
                    })
                    .collect();
                // A large eps on one tensor makes its placement (after the bias correction) matter.
                let hypers: Vec<AdamWHyper> = (0..lens.len())
                    .map(|k| AdamWHyper {
                        eps: if k == 3 { 1e-3 } else { 1e-8 },
                        ..hyper(lr, if k == 1 { 0.0 } else { 0.1 })
                    })
                    .collect();
                let mut ups: Vec<AdamWUpdate> = p32
                    .iter_mut()
                    .zip(&grads)
                    .zip(&states)
                    .zip(&hypers)
                    .map(|(((p, g), s), h)| AdamWUpdate {
                        param: p,
                        grad: g,
                        state: s,
                        hyper: *h,
                    })
                    .collect();
                adamw_step(&pool, &mut ups).unwrap();
                for k in 0..lens.len() {
                    let g64: Vec<f64> = grads[k].iter().map(|&x| x as f64).collect();
                    reference(
                        &mut p64[k],
                        &mut m64[k],
                        &mut v64[k],
                        &g64,
                        &hypers[k],
                        step as f64,
                    );
                    assert_eq!(states[k].step(), step as f32);
                }
            }
            for k in 0..lens.len() {
                let mut worst = 0f64;
                for i in 0..lens[k] {
                    // Relative to the update size (1e-2 per step), so the bound is meaningful.
                    let err = (p32[k][i] as f64 - p64[k][i]).abs() / (p64[k][i].abs() + 1e-2);
                    worst = worst.max(err);
                    let em = (states[k].exp_avg().as_slice()[i] as f64 - m64[k][i]).abs();
                    assert!(em <= 1e-8 + 1e-6 * m64[k][i].abs(), "m {k} {i}: {em}");
                }
                assert!(worst < 1e-5, "tensor {k}: {worst}");
            }
            // Zero gradients: moments stay zero and only weight decay moves the weights.
            assert!(states[5].exp_avg_sq().as_slice().iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn portable_and_fused_builds_agree() {
        // The portable loop (CPUs without AVX2+FMA) rounds lerp and addcmul unfused: it
        // must stay within fp32 rounding of the build this machine runs.
        let n = 1000;
        let mut seed = 3u64;
        let p0: Vec<f32> = (0..n).map(|_| lcg(&mut seed) as f32).collect();
        let g: Vec<f32> = (0..n).map(|_| (lcg(&mut seed) * 0.1) as f32).collect();
        let m0: Vec<f32> = (0..n).map(|_| (lcg(&mut seed) * 0.01) as f32).collect();
        let v0: Vec<f32> = (0..n)
            .map(|_| (lcg(&mut seed) * 1e-3).abs() as f32)
            .collect();
        let c = Coeffs::new(&hyper(1e-2, 0.1), 3.0);
        let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
        let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
        run_chunk(&mut p1, &g, &mut m1, &mut v1, c, false);
        run_chunk(&mut p2, &g, &mut m2, &mut v2, c, has_avx2_fma());
        for i in 0..n {
            assert!((p1[i] - p2[i]).abs() <= 1e-6 * p2[i].abs() + 1e-9, "{i}");
            assert!((m1[i] - m2[i]).abs() <= 1e-6 * m2[i].abs() + 2e-9, "{i}");
            assert!((v1[i] - v2[i]).abs() <= 1e-6 * v2[i].abs(), "{i}");
            assert!(p1[i] != p0[i]);
        }
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let n = 5 * CHUNK + 3;
        let run = |threads: usize| {
            let pool = ThreadPool::new(threads, false).expect("pool");
            let mut seed = 7u64;
            let mut p: Vec<f32> = (0..n).map(|_| lcg(&mut seed) as f32).collect();
            let g: Vec<f32> = (0..n).map(|_| lcg(&mut seed) as f32).collect();
            let s = AdamWState::new(n);
            for _ in 0..3 {
                adamw_step(
                    &pool,
                    &mut [AdamWUpdate {
                        param: &mut p,
                        grad: &g,
                        state: &s,
                        hyper: hyper(1e-3, 0.01),
                    }],
                )
                .unwrap();
            }
            p
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn bad_input_is_refused_and_writes_nothing() {
        let pool = ThreadPool::new(2, false).expect("pool");
        let s = AdamWState::new(4);
        let mut p = vec![1.0f32; 4];
        let g = vec![1.0f32; 3];
        let e = adamw_step(
            &pool,
            &mut [AdamWUpdate {
                param: &mut p,
                grad: &g,
                state: &s,
                hyper: hyper(1e-3, 0.0),
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("grads[0]"), "{e}");
        let g = vec![1.0f32; 4];
        let mut bad = hyper(1e-3, 0.0);
        bad.beta2 = 1.0;
        let e = adamw_step(
            &pool,
            &mut [AdamWUpdate {
                param: &mut p,
                grad: &g,
                state: &s,
                hyper: bad,
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("betas[1]"), "{e}");
        let mut q = vec![1.0f32; 4];
        let e = adamw_step(
            &pool,
            &mut [
                AdamWUpdate {
                    param: &mut p,
                    grad: &g,
                    state: &s,
                    hyper: hyper(1e-3, 0.0),
                },
                AdamWUpdate {
                    param: &mut q,
                    grad: &g,
                    state: &s,
                    hyper: hyper(1e-3, 0.0),
                },
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("states[1]"), "{e}");
        assert_eq!(s.step(), 0.0);
        assert!(p.iter().all(|&x| x == 1.0));
        assert!(s.load(&[0.0; 4], &[0.0; 4], 1.5).is_err());
        s.load(&[1.0; 4], &[2.0; 4], 3.0).unwrap();
        assert_eq!((s.step(), s.exp_avg_sq().as_slice()[3]), (3.0, 2.0));
    }

    #[test]
    fn overlap_detection() {
        assert_eq!(find_overlap(&[(0, 8), (8, 16)], &[(16, 20), (2, 2)]), None);
        assert_eq!(
            find_overlap(&[(16, 24), (0, 8), (4, 12)], &[]),
            Some(Overlap::Written(1, 2))
        );
        assert_eq!(
            find_overlap(&[(0, 8), (16, 24)], &[(30, 31), (7, 9)]),
            Some(Overlap::Read {
                read: 1,
                written: 0
            })
        );
        assert_eq!(
            find_overlap(&[(0, 8), (16, 24)], &[(20, 40)]),
            Some(Overlap::Read {
                read: 0,
                written: 1
            })
        );
        assert!(find_overlap(&[(0, 8), (16, 24)], &[(8, 16), (0, 0)]).is_none());
    }
}
