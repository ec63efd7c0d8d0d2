//! `HostStage`: one MoE layer's routed experts as a host node of a CUDA stream or graph.
//!
//! It owns pinned staging memory for one batch size (hidden `[B, H]` bf16, ids `[B, k]`
//! int64, weights `[B, k]` f32, out `[B, H]` bf16), shown to Python as zero-copy tensors.
//! The decode path copies a layer's inputs into it on the stream, calls `launch`, and
//! copies `out` back; captured in a CUDA graph, each replay runs the experts in stream
//! order with no Python involved. The host function reads the layer's current weights
//! and LoRA at each run, so nothing it uses can be a stale copy.

use crate::dlpack::{export_raw, DType};
use crate::error::IntoPy;
use crate::experts::Experts;
use crate::staging::{Grads, Layout};
use ktrs::cuda::{ChannelJob, HostFn, PinnedBlock, StreamChannel};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the host function reports back: the first error, and how long it ran.
#[derive(Default)]
struct Report {
    error: Mutex<Option<String>>,
    runs: AtomicU64,
    busy_ns: AtomicU64,
}

/// How a stage's run gets onto a stream.
enum Launcher {
    /// A host node (`cuLaunchHostFunc`), run by the driver's callback thread.
    HostFn(HostFn),
    /// A flag write and wait answered by a channel's spinning thread (faster).
    Channel(ChannelJob),
}

/// A thread that answers stream flag writes with runs of registered stages (see
/// `ktrs::cuda::StreamChannel`). One per model; `active` while a decode is running.
#[pyclass(module = "ktrs._native", name = "StreamChannel", frozen)]
pub struct PyStreamChannel {
    channel: StreamChannel,
}

#[pymethods]
impl PyStreamChannel {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyStreamChannel {
            channel: StreamChannel::new().py_err()?,
        })
    }

    /// True where the CUDA driver offers stream memory operations.
    #[staticmethod]
    fn available() -> bool {
        StreamChannel::available()
    }

    /// Spin while a decode runs (true), poll every millisecond otherwise.
    fn set_active(&self, on: bool) {
        self.channel.set_active(on);
    }
}

#[pyclass(module = "ktrs._native", name = "HostStage")]
pub struct HostStage {
    launcher: Launcher,
    block: Arc<PinnedBlock>,
    layout: Layout,
    report: Arc<Report>,
}

#[pymethods]
impl HostStage {
    /// Staging for `tokens` rows routed to `top_k` experts each, for `experts`' layer,
    /// launched through `channel` when given, else as a host node.
    #[new]
    /// `use_lora=False` runs the base experts although the layer has LoRA (PEFT's
    /// `disable_adapter` while the graph was captured).
    #[pyo3(signature = (experts, tokens, top_k, channel=None, use_lora=true))]
    fn new(
        experts: &Experts,
        tokens: usize,
        top_k: usize,
        channel: Option<&PyStreamChannel>,
        use_lora: bool,
    ) -> PyResult<Self> {
        let hidden = experts.layer().config.hidden;
        if tokens == 0 || top_k == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "`tokens` and `top_k` must be positive, got {tokens} and {top_k}"
            )));
        }
        let layout = Layout::new(tokens, top_k, hidden, Grads::None)
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("staging size overflows"))?;
        let block = Arc::new(PinnedBlock::new(layout.bytes).py_err()?);
        let report = Arc::new(Report::default());
        let layer = experts.shared_layer();
        let (mem, rep) = (SendPtr(block.as_ptr()), report.clone());
        let l = layout;
        let job = move || {
            let t0 = std::time::Instant::now();
            let guard = layer.read().unwrap_or_else(|e| e.into_inner());
            let base = mem.get();
            // SAFETY: the four regions lie inside the pinned block (Layout), which lives
            // as long as this closure (`block` is dropped after `launcher`, which waits
            // for a run in progress and keeps later runs from starting), and
            // the stream orders the copies that fill them before this run.
            let (x, ids, w, out) = unsafe {
                (
                    std::slice::from_raw_parts(base.add(l.x) as *const u16, l.tokens * l.hidden),
                    std::slice::from_raw_parts(base.add(l.ids) as *const i64, l.tokens * l.top_k),
                    std::slice::from_raw_parts(base.add(l.w) as *const f32, l.tokens * l.top_k),
                    std::slice::from_raw_parts_mut(
                        base.add(l.out) as *mut u16,
                        l.tokens * l.hidden,
                    ),
                )
            };
            if let Err(e) = guard.forward_with(x, l.tokens, ids, w, l.top_k, out, false, use_lora) {
                // Zeros rather than stale values; Python raises the error after the step.
                out.fill(0);
                let mut slot = rep.error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert_with(|| e.to_string());
            }
            rep.runs.fetch_add(1, Ordering::Relaxed);
            rep.busy_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        };
        let launcher = match channel {
            Some(c) => Launcher::Channel(c.channel.add(job)),
            None => Launcher::HostFn(HostFn::new(job)),
        };
        Ok(HostStage {
            launcher,
            block,
            layout,
            report,
        })
    }

    /// Zero-copy views of the staging memory: `(hidden, topk_ids, topk_weights, out)`.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let l = self.layout;
        let base = self.block.as_ptr();
        let owner: Arc<dyn Send + Sync> = self.block.clone();
        let parts = [
            (l.x, DType::BF16, [l.tokens, l.hidden]),
            (l.ids, DType::I64, [l.tokens, l.top_k]),
            (l.w, DType::F32, [l.tokens, l.top_k]),
            (l.out, DType::BF16, [l.tokens, l.hidden]),
        ];
        parts
            .iter()
            // SAFETY: each region lies inside the block (Layout) and `owner` keeps it alive.
            .map(|&(off, dt, shape)| unsafe {
                export_raw(py, owner.clone(), base.add(off), dt, &shape)
            })
            .collect()
    }

    /// Puts one run of the experts on the CUDA stream `stream` (a `cudaStream_t` as an
    /// integer: `torch.cuda.current_stream().cuda_stream`); under graph capture, records it.
    /// Same as `submit` then `finish`.
    fn launch(&self, stream: usize) -> PyResult<()> {
        self.submit(stream)?;
        self.finish(stream)
    }

    /// Starts the run (stream order); GPU work enqueued before `finish` overlaps it.
    fn submit(&self, stream: usize) -> PyResult<()> {
        let stream = stream as *mut std::ffi::c_void;
        // SAFETY: the caller passes torch's handle of a live stream (module-private API).
        match &self.launcher {
            Launcher::HostFn(h) => unsafe { h.launch(stream) },
            Launcher::Channel(j) => unsafe { j.submit(stream) },
        }
        .py_err()
    }

    /// Makes the stream wait for the run `submit` started (a host node needs no wait:
    /// it blocks the stream itself, so GPU work after it does not overlap).
    fn finish(&self, stream: usize) -> PyResult<()> {
        match &self.launcher {
            Launcher::HostFn(_) => Ok(()),
            // SAFETY: as in `submit`.
            Launcher::Channel(j) => unsafe { j.finish(stream as *mut std::ffi::c_void) }.py_err(),
        }
    }

    /// The first error a run hit since the last call (then cleared), or None.
    fn take_error(&self) -> Option<String> {
        self.report
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Runs so far.
    #[getter]
    fn runs(&self) -> u64 {
        self.report.runs.load(Ordering::Relaxed)
    }

    /// Seconds spent in runs so far (the CPU experts, lock wait included).
    #[getter]
    fn busy_seconds(&self) -> f64 {
        self.report.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    #[getter]
    fn tokens(&self) -> usize {
        self.layout.tokens
    }

    #[getter]
    fn top_k(&self) -> usize {
        self.layout.top_k
    }

    /// True where the CUDA driver library can be opened.
    #[staticmethod]
    fn driver_available() -> bool {
        ktrs::cuda::driver_available()
    }
}

struct SendPtr(*mut u8);
// SAFETY: points into the pinned block, which the closure's owner keeps alive.
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole `SendPtr` (not its raw field).
    fn get(&self) -> *mut u8 {
        self.0
    }
}
