//! `TrainStage`: one training call of a layer's routed experts (forward, then its
//! backward) as work in a CUDA stream's order, so that Python never waits for the CPU.
//!
//! Python enqueues on the current stream: the copies of the inputs into this stage's
//! pinned memory, `forward` (a host function that runs the experts on the worker pool and
//! keeps the `ForwardCache` here), and the copy of the output back. Later, on the same
//! stream, `backward` does the same with the output gradient, writing the expert LoRA
//! gradients into the layer's own gradient buffers (the parameters' `.grad` view them).
//! Python learns of the result at one sync point per backward (`wait`), where errors
//! recorded by the host functions are raised.
//!
//! Under activation checkpointing the recompute of a forward kept in a stage is enqueued
//! on a stage of its own (`recompute`): its host function compares the recompute's inputs
//! with the kept forward's, byte for byte, and on a match hands back the kept output (and,
//! for reentrant checkpointing, the cache) without running the experts; otherwise it runs
//! the forward on the new inputs. A stage whose forward is kept for a recompute has
//! separate backward regions (`Grads::Separate`), so its inputs and output outlive its
//! backward.
//!
//! A host function cannot return anything, so each run takes its arguments from a queue
//! filled at launch (launches of one stage run in launch order: one stream, or events),
//! and reports through counters and an error slot.

use crate::dlpack::{export_raw, DType};
use crate::error::{guard, to_py, Kind};
use crate::experts::Experts;
use crate::staging::{Grads, Layout};
use ktrs::buffer::Buffer;
use ktrs::cuda::{HostFn, PinnedBlock};
use ktrs::{ForwardCache, GradTarget, KtrsError as CoreError, LoraMatrix, MoeLayer};
use pyo3::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Pinned (for asynchronous CUDA copies) or plain memory (runs without CUDA, in tests).
enum Memory {
    Pinned(PinnedBlock),
    Heap(Buffer<u64>),
}

impl Memory {
    fn base(&self) -> *mut u8 {
        match self {
            Memory::Pinned(b) => b.as_ptr(),
            Memory::Heap(b) => b.as_ptr() as *mut u8,
        }
    }
}

/// What a failed run leaves for Python: a kernel's error, or a guard's message.
enum StageError {
    Core(CoreError),
    Msg(Kind, String),
}

struct FwdArgs {
    save: bool,
    use_lora: bool,
    guard: bool,
    /// `epoch` at launch: a forward launched before `drop_cache` keeps no cache.
    epoch: u64,
}

/// A checkpoint recompute of the forward kept in `kept`.
struct RecArgs {
    kept: Arc<Shared>,
    /// Python's part of the match (layer, state, shapes) held: compare the inputs.
    reuse: bool,
    /// Move the kept cache here on a match (reentrant checkpointing: this call's backward
    /// runs); else it stays with the kept forward (whose own backward runs).
    take_cache: bool,
    fwd: FwdArgs,
}

struct BwdArgs {
    lora: bool,
    overwrite: bool,
    guard: bool,
}

/// Orders errors of all stages: the earliest run's error is the cause (a non-finite
/// output of one layer makes the next layer refuse its input).
static ERROR_SEQ: AtomicU64 = AtomicU64::new(1);

struct Shared {
    layer: Arc<RwLock<MoeLayer>>,
    mem: Arc<Memory>,
    l: Layout,
    name: String,
    fwd_args: Mutex<VecDeque<FwdArgs>>,
    bwd_args: Mutex<VecDeque<BwdArgs>>,
    rec_args: Mutex<VecDeque<RecArgs>>,
    epoch: AtomicU64,
    cache: Mutex<Option<ForwardCache>>,
    error: Mutex<Option<(u64, StageError)>>,
    launched: AtomicU64,
    done: Mutex<u64>,
    done_cv: Condvar,
    fwd_runs: AtomicU64,
    fwd_ns: AtomicU64,
    bwd_runs: AtomicU64,
    bwd_ns: AtomicU64,
    /// Recomputes that ran the experts, and those served from the kept forward.
    rec_runs: AtomicU64,
    reused: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rows of `x` (`rows × cols` bf16) holding NaN or Inf, or None when all are finite.
fn bad_rows(x: &[u16], cols: usize) -> Option<Vec<usize>> {
    if !ktrs::bf16::any_non_finite(x) {
        return None;
    }
    Some(
        x.chunks(cols)
            .enumerate()
            .filter(|(_, r)| ktrs::bf16::any_non_finite(r))
            .map(|(t, _)| t)
            .collect(),
    )
}

fn any_non_finite_f32(x: &[f32]) -> bool {
    x.chunks(64).any(|c| {
        c.iter().fold(false, |bad, v| {
            bad | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        })
    })
}

impl Shared {
    /// Slices of the staging memory.
    ///
    /// # Safety
    /// Only the stream's current run may use them: copies and runs of one stage are
    /// ordered by its stream (Python makes another stream wait for the stage's event).
    #[allow(clippy::mut_from_ref)]
    unsafe fn region<T>(&self, off: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.mem.base().add(off) as *mut T, len)
    }

    fn fail(&self, e: StageError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some((ERROR_SEQ.fetch_add(1, Ordering::SeqCst), e));
        }
    }

    /// "tokens [..] (routed to experts [..]); n rows affected", as the synchronous guard says.
    fn rows_message(&self, what: &str, rows: &[usize]) -> String {
        let l = self.l;
        // SAFETY: the ids region holds this stage's forward ids until its next forward.
        let ids: &[i64] = unsafe { self.region(l.ids, l.tokens * l.top_k) };
        let toks: Vec<usize> = rows.iter().take(4).copied().collect();
        let mut experts: Vec<i64> = toks
            .iter()
            .flat_map(|&t| ids[t * l.top_k..(t + 1) * l.top_k].iter().copied())
            .collect();
        experts.sort_unstable();
        experts.dedup();
        format!(
            "ktrs: non-finite {what} in {}: tokens {toks:?} (routed to experts {experts:?}); {} rows affected",
            self.name,
            rows.len()
        )
    }

    fn run_forward(&self) {
        let t0 = Instant::now();
        let args = lock(&self.fwd_args).pop_front();
        if let Some(a) = args {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.forward(a)));
            if r.is_err() {
                self.fail(StageError::Msg(
                    Kind::Internal,
                    format!("ktrs: the expert forward of {} panicked", self.name),
                ));
            }
        }
        self.fwd_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.fwd_runs.fetch_add(1, Ordering::Relaxed);
        self.finish_one();
    }

    fn forward(&self, a: FwdArgs) {
        let l = self.l;
        let layer = self.layer.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: see `region`; the four regions are disjoint (Layout).
        let (x, ids, w, out) = unsafe {
            (
                &*self.region::<u16>(l.x, l.tokens * l.hidden),
                &*self.region::<i64>(l.ids, l.tokens * l.top_k),
                &*self.region::<f32>(l.w, l.tokens * l.top_k),
                self.region::<u16>(l.out, l.tokens * l.hidden),
            )
        };
        let mut cache = lock(&self.cache);
        *cache = None; // the previous call's cache goes before the new one is made
        let save = a.save && self.epoch.load(Ordering::SeqCst) == a.epoch;
        match layer.forward_with(x, l.tokens, ids, w, l.top_k, out, save, a.use_lora) {
            Ok(c) => {
                *cache = c;
                if a.guard {
                    if let Some(rows) = bad_rows(out, l.hidden) {
                        self.fail(StageError::Msg(
                            Kind::NonFinite,
                            self.rows_message("expert output", &rows),
                        ));
                        // Zeros stop the NaN from reaching later layers' errors first.
                        out.fill(0);
                    }
                }
            }
            Err(e) => {
                out.fill(0);
                self.fail(StageError::Core(e));
            }
        }
    }

    fn run_backward(&self) {
        let t0 = Instant::now();
        let args = lock(&self.bwd_args).pop_front();
        if let Some(a) = args {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.backward(a)));
            if r.is_err() {
                self.fail(StageError::Msg(
                    Kind::Internal,
                    format!("ktrs: the expert backward of {} panicked", self.name),
                ));
            }
        }
        self.bwd_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bwd_runs.fetch_add(1, Ordering::Relaxed);
        self.finish_one();
    }

    fn backward(&self, a: BwdArgs) {
        let l = self.l;
        let g = l.grad();
        let layer = self.layer.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: see `region`; the three regions are disjoint (Layout), and the
        // forward that may share two of them has run (stream order).
        let (gout, gx, gw) = unsafe {
            (
                &*self.region::<u16>(g.gout, l.tokens * l.hidden),
                self.region::<u16>(g.gx, l.tokens * l.hidden),
                self.region::<f32>(g.gw, l.tokens * l.top_k),
            )
        };
        let cache = lock(&self.cache);
        let Some(cache) = cache.as_ref() else {
            gx.fill(0);
            gw.fill(0.0);
            self.fail(StageError::Msg(
                Kind::StaleHandle,
                format!("ktrs: backward of {} without a saved forward (the forward failed, or ran under torch.no_grad())", self.name),
            ));
            return;
        };
        let lora = layer.lora().filter(|_| a.lora);
        let target = match lora {
            None => GradTarget::Skip,
            Some(_) if !a.overwrite => GradTarget::Owned,
            Some(lw) => {
                // SAFETY: the layer's gradient buffers are written only by its backward
                // runs, which follow one another in stream order, and read by Python only
                // after the sync point that waits for them (their `.grad` views).
                let bufs = LoraMatrix::ALL.map(|m| unsafe { lw.grad(m).as_mut_slice_unchecked() });
                GradTarget::External {
                    bufs,
                    accumulate: false,
                }
            }
        };
        if let Err(e) = layer.backward(cache, gout, gx, gw, target) {
            gx.fill(0);
            gw.fill(0.0);
            self.fail(StageError::Core(e));
            return;
        }
        if !a.guard {
            return;
        }
        if let Some(rows) = bad_rows(gx, l.hidden) {
            self.fail(StageError::Msg(
                Kind::NonFinite,
                self.rows_message("input gradient", &rows),
            ));
            return;
        }
        for m in LoraMatrix::ALL {
            let Some(lw) = lora else { break };
            let g = lw.grad(m).as_slice();
            if !any_non_finite_f32(g) {
                continue;
            }
            let [_, r, c] = lw.shape(m);
            let bad: Vec<usize> = g
                .chunks(r * c)
                .enumerate()
                .filter(|(_, e)| any_non_finite_f32(e))
                .map(|(e, _)| e)
                .take(8)
                .collect();
            self.fail(StageError::Msg(
                Kind::NonFinite,
                format!(
                    "ktrs: non-finite gradient of expert LoRA {} in {}, experts {bad:?}",
                    m.name(),
                    self.name
                ),
            ));
            return;
        }
    }

    fn run_recompute(&self) {
        let t0 = Instant::now();
        let args = lock(&self.rec_args).pop_front();
        let mut ran = true;
        if let Some(a) = args {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if a.reuse && self.reuse(&a.kept, a.take_cache) {
                    ran = false;
                } else {
                    self.forward(a.fwd);
                }
            }));
            if r.is_err() {
                self.fail(StageError::Msg(
                    Kind::Internal,
                    format!("ktrs: the expert recompute of {} panicked", self.name),
                ));
            }
        }
        if ran {
            self.fwd_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.rec_runs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        self.finish_one();
    }

    /// Serves this stage's forward from `kept` when its inputs are `kept`'s, byte for
    /// byte, and `kept` still holds its cache: the kept output is copied here and, with
    /// `take_cache`, the cache moves here. False (nothing changed) otherwise.
    fn reuse(&self, kept: &Shared, take_cache: bool) -> bool {
        let (l, k) = (self.l, kept.l);
        if (l.tokens, l.top_k, l.hidden) != (k.tokens, k.top_k, k.hidden)
            || std::ptr::eq(self, kept)
        {
            return false;
        }
        let (th, tk) = (l.tokens * l.hidden, l.tokens * l.top_k);
        // SAFETY: see `region`; `kept`'s forward ran before this (stream order: Python
        // makes this stream wait for `kept`'s last event), and nothing writes its
        // forward regions until it is released, after this run (Python holds it).
        let same = unsafe {
            self.region::<u16>(l.x, th) == kept.region::<u16>(k.x, th)
                && self.region::<i64>(l.ids, tk) == kept.region::<i64>(k.ids, tk)
                && self.region::<u32>(l.w, tk) == kept.region::<u32>(k.w, tk)
        };
        if !same {
            return false;
        }
        let mut kc = lock(&kept.cache);
        if kc.is_none() {
            return false;
        }
        let moved = if take_cache { kc.take() } else { None };
        drop(kc);
        // SAFETY: as above; `out` regions of two stages are disjoint memory.
        unsafe {
            self.region::<u16>(l.out, th)
                .copy_from_slice(kept.region::<u16>(k.out, th));
        }
        let mut mine = lock(&self.cache);
        *mine = moved;
        true
    }

    fn finish_one(&self) {
        *lock(&self.done) += 1;
        self.done_cv.notify_all();
    }
}

#[pyclass(module = "ktrs._native", name = "TrainStage")]
pub struct TrainStage {
    // Dropped first: waits for a run in progress and empties the slots, so no later run
    // of an enqueued node touches `shared`.
    fwd: HostFn,
    bwd: HostFn,
    rec: HostFn,
    shared: Arc<Shared>,
}

enum Dir {
    Fwd,
    Bwd,
    Rec,
}

impl TrainStage {
    fn launch(&self, py: Python<'_>, dir: Dir, stream: Option<usize>) -> PyResult<()> {
        let s = &self.shared;
        s.launched.fetch_add(1, Ordering::SeqCst);
        let Some(stream) = stream else {
            // No CUDA: the run happens now (tests of the bookkeeping on CPU machines).
            let s = s.clone();
            py.detach(move || match dir {
                Dir::Fwd => s.run_forward(),
                Dir::Bwd => s.run_backward(),
                Dir::Rec => s.run_recompute(),
            });
            return Ok(());
        };
        let h = match dir {
            Dir::Fwd => &self.fwd,
            Dir::Bwd => &self.bwd,
            Dir::Rec => &self.rec,
        };
        // SAFETY: the caller passes torch's handle of a live stream (module-private API).
        let r = unsafe { h.launch(stream as *mut std::ffi::c_void) };
        if let Err(e) = r {
            // Nothing was enqueued: take back the arguments and the count.
            match dir {
                Dir::Fwd => drop(lock(&s.fwd_args).pop_back()),
                Dir::Bwd => drop(lock(&s.bwd_args).pop_back()),
                Dir::Rec => drop(lock(&s.rec_args).pop_back()),
            }
            s.launched.fetch_sub(1, Ordering::SeqCst);
            return Err(to_py(e));
        }
        Ok(())
    }
}

#[pymethods]
impl TrainStage {
    /// Staging for `tokens` rows routed to `top_k` experts each of `experts`' layer;
    /// `name` labels errors. `pinned=False` uses plain memory (no CUDA needed; the runs
    /// then happen at launch, with `stream=None`). `keep=True` gives the backward its own
    /// regions, so the forward's inputs and output stay for a checkpoint recompute.
    #[new]
    #[pyo3(signature = (experts, tokens, top_k, name, pinned=true, keep=false))]
    fn new(
        experts: &Experts,
        tokens: usize,
        top_k: usize,
        name: String,
        pinned: bool,
        keep: bool,
    ) -> PyResult<Self> {
        guard(|| {
            let hidden = experts.layer().config.hidden;
            if tokens == 0 || top_k == 0 {
                return Err(crate::error::value_err(format!(
                    "`tokens` and `top_k` must be positive, got {tokens} and {top_k}"
                )));
            }
            let grads = if keep { Grads::Separate } else { Grads::Shared };
            let l = Layout::new(tokens, top_k, hidden, grads)
                .ok_or_else(|| crate::error::value_err("staging size overflows"))?;
            let mem = if pinned {
                Memory::Pinned(PinnedBlock::new(l.bytes).map_err(to_py)?)
            } else {
                Memory::Heap(
                    Buffer::try_zeroed("training staging", l.bytes.div_ceil(8)).map_err(to_py)?,
                )
            };
            let shared = Arc::new(Shared {
                layer: experts.shared_layer(),
                mem: Arc::new(mem),
                l,
                name,
                fwd_args: Mutex::new(VecDeque::new()),
                bwd_args: Mutex::new(VecDeque::new()),
                rec_args: Mutex::new(VecDeque::new()),
                epoch: AtomicU64::new(0),
                cache: Mutex::new(None),
                error: Mutex::new(None),
                launched: AtomicU64::new(0),
                done: Mutex::new(0),
                done_cv: Condvar::new(),
                fwd_runs: AtomicU64::new(0),
                fwd_ns: AtomicU64::new(0),
                bwd_runs: AtomicU64::new(0),
                bwd_ns: AtomicU64::new(0),
                rec_runs: AtomicU64::new(0),
                reused: AtomicU64::new(0),
            });
            let (f, b, r) = (shared.clone(), shared.clone(), shared.clone());
            Ok(TrainStage {
                fwd: HostFn::new(move || f.run_forward()),
                bwd: HostFn::new(move || b.run_backward()),
                rec: HostFn::new(move || r.run_recompute()),
                shared,
            })
        })
    }

    /// Zero-copy views: `(x, ids, w, out, grad_out, grad_hidden, grad_weights)`.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let l = self.shared.l;
        let base = self.shared.mem.base();
        let owner: Arc<dyn Send + Sync> = self.shared.mem.clone();
        let g = l.grad();
        let th = [l.tokens, l.hidden];
        let tk = [l.tokens, l.top_k];
        let parts = [
            (l.x, DType::BF16, th),
            (l.ids, DType::I64, tk),
            (l.w, DType::F32, tk),
            (l.out, DType::BF16, th),
            (g.gout, DType::BF16, th),
            (g.gx, DType::BF16, th),
            (g.gw, DType::F32, tk),
        ];
        parts
            .iter()
            // SAFETY: each region lies inside the memory (Layout) and `owner` keeps it alive.
            .map(|&(off, dt, shape)| unsafe {
                export_raw(py, owner.clone(), base.add(off), dt, &shape)
            })
            .collect()
    }

    /// Enqueues the forward on `stream` (`cudaStream_t` as an int), or runs it now (None).
    #[pyo3(signature = (stream, *, save, use_lora, guard))]
    fn forward(
        &self,
        py: Python<'_>,
        stream: Option<usize>,
        save: bool,
        use_lora: bool,
        guard: bool,
    ) -> PyResult<()> {
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        lock(&self.shared.fwd_args).push_back(FwdArgs {
            save,
            use_lora,
            guard,
            epoch,
        });
        self.launch(py, Dir::Fwd, stream)
    }

    /// Enqueues the checkpoint recompute of the forward kept in `kept` (its inputs are in
    /// this stage's `x, ids, w`): with `reuse` (the layer and its state are `kept`'s) and
    /// the same inputs, byte for byte, the kept output is copied to `out` and, with
    /// `take_cache`, the kept cache moves here; otherwise the forward runs here as
    /// `forward` would (`save`, `use_lora`, `guard`). The caller keeps `kept` alive and
    /// unused until this has run.
    #[pyo3(signature = (stream, kept, *, reuse, take_cache, save, use_lora, guard))]
    #[allow(clippy::too_many_arguments)]
    fn recompute(
        &self,
        py: Python<'_>,
        stream: Option<usize>,
        kept: &TrainStage,
        reuse: bool,
        take_cache: bool,
        save: bool,
        use_lora: bool,
        guard: bool,
    ) -> PyResult<()> {
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        lock(&self.shared.rec_args).push_back(RecArgs {
            kept: kept.shared.clone(),
            reuse,
            take_cache,
            fwd: FwdArgs {
                save,
                use_lora,
                guard,
                epoch,
            },
        });
        self.launch(py, Dir::Rec, stream)
    }

    /// Enqueues the backward of the last forward. LoRA gradients (with `lora`) go into the
    /// layer's gradient buffers: overwritten with `overwrite`, else added to.
    #[pyo3(signature = (stream, *, lora, overwrite, guard))]
    fn backward(
        &self,
        py: Python<'_>,
        stream: Option<usize>,
        lora: bool,
        overwrite: bool,
        guard: bool,
    ) -> PyResult<()> {
        lock(&self.shared.bwd_args).push_back(BwdArgs {
            lora,
            overwrite,
            guard,
        });
        self.launch(py, Dir::Bwd, stream)
    }

    /// Launched runs that have not finished yet.
    #[getter]
    fn pending(&self) -> u64 {
        let done = *lock(&self.shared.done);
        self.shared
            .launched
            .load(Ordering::SeqCst)
            .saturating_sub(done)
    }

    /// Blocks (GIL released, Ctrl-C honoured) until every launched run has finished.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared;
        loop {
            let target = s.launched.load(Ordering::SeqCst);
            let finished = py.detach(|| {
                let g = lock(&s.done);
                let (g, _) = s
                    .done_cv
                    .wait_timeout_while(g, Duration::from_millis(100), |d| *d < target)
                    .unwrap_or_else(|e| e.into_inner());
                *g >= target
            });
            if finished {
                return Ok(());
            }
            py.check_signals()?;
        }
    }

    /// The sequence number of the recorded error (lower = earlier run), or None.
    #[getter]
    fn error_seq(&self) -> Option<u64> {
        lock(&self.shared.error).as_ref().map(|(s, _)| *s)
    }

    /// Raises the first error a run recorded (and clears it); returns otherwise.
    fn raise_error(&self) -> PyResult<()> {
        match lock(&self.shared.error).take() {
            None => Ok(()),
            Some((_, StageError::Core(e))) => Err(to_py(e)),
            Some((_, StageError::Msg(k, m))) => Err(crate::error::err(k, m)),
        }
    }

    /// `(forward runs, seconds, backward runs, seconds, recomputes that ran the experts,
    /// recomputes served from a kept forward)` since the last call; the recomputes' run
    /// time is in the forward seconds.
    fn take_times(&self) -> (u64, f64, u64, f64, u64, u64) {
        let s = &self.shared;
        let ns = |a: &AtomicU64| a.swap(0, Ordering::Relaxed) as f64 * 1e-9;
        (
            s.fwd_runs.swap(0, Ordering::Relaxed),
            ns(&s.fwd_ns),
            s.bwd_runs.swap(0, Ordering::Relaxed),
            ns(&s.bwd_ns),
            s.rec_runs.swap(0, Ordering::Relaxed),
            s.reused.swap(0, Ordering::Relaxed),
        )
    }

    /// Frees the forward cache (waits for a run holding it); forwards launched before
    /// this and not run yet keep none.
    fn drop_cache(&self, py: Python<'_>) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        let s = self.shared.clone();
        let cache = py.detach(move || lock(&s.cache).take());
        drop(cache);
    }

    /// Whether a forward cache is held now.
    #[getter]
    fn has_cache(&self) -> bool {
        lock(&self.shared.cache).is_some()
    }

    /// Bytes of staging memory.
    #[getter]
    fn nbytes(&self) -> usize {
        self.shared.l.bytes
    }
}
