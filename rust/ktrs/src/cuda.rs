//! CPU work in a CUDA stream's order, without linking CUDA.
//!
//! The decode fast path records a whole decode step as one CUDA graph. Each MoE layer's
//! routed experts enter that graph as a *host node*: the stream copies the layer's inputs
//! into pinned host memory, runs a [`HostFn`] (the experts, on the CPU worker pool) and
//! copies the result back. `cuLaunchHostFunc` puts such a function on a stream; while a
//! graph is being captured, the call is recorded instead of run.
//!
//! The driver library is opened at run time (`dlopen("libcuda.so.1")`) on first use, so
//! the crate builds and runs where there is no CUDA at all; there these functions return
//! [`KtrsError::System`].
//!
//! CUDA's rules for host functions (no CUDA call inside one, keep them short) are why a
//! `HostFn` only runs a closure, and why its memory is registered beforehand, not inside.

use crate::error::{KtrsError, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

type CuResult = i32;
type HostCallback = unsafe extern "C" fn(*mut c_void);

type LaunchHostFunc = unsafe extern "C" fn(*mut c_void, HostCallback, *mut c_void) -> CuResult;
type MemHostRegister = unsafe extern "C" fn(*mut c_void, usize, u32) -> CuResult;
type MemHostUnregister = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CtxGetCurrent = unsafe extern "C" fn(*mut *mut c_void) -> CuResult;
type GetErrorString = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;
type StreamValue32 = unsafe extern "C" fn(*mut c_void, u64, u32, u32) -> CuResult;
type MemHostGetDevicePointer = unsafe extern "C" fn(*mut u64, *mut c_void, u32) -> CuResult;

/// The few driver entry points the host path needs.
struct Driver {
    launch_host_func: LaunchHostFunc,
    mem_host_register: MemHostRegister,
    mem_host_unregister: MemHostUnregister,
    ctx_get_current: CtxGetCurrent,
    get_error_string: GetErrorString,
    /// Stream memory operations (`cuStreamWriteValue32_v2`, `cuStreamWaitValue32_v2`) and
    /// mapped host pointers: what [`StreamChannel`] needs; absent on old drivers.
    memops: Option<Memops>,
}

/// `CU_MEMHOSTREGISTER_PORTABLE`: pinned for every context, not only the current one.
const REGISTER_PORTABLE: u32 = 1;
/// `CU_MEMHOSTREGISTER_DEVICEMAP`: the GPU may address the block (flags of a channel).
const REGISTER_DEVICEMAP: u32 = 2;
/// `CU_STREAM_WAIT_VALUE_EQ`.
const WAIT_EQ: u32 = 1;

fn driver() -> Result<&'static Driver> {
    static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(load_driver)
        .as_ref()
        .map_err(|e| KtrsError::System(e.clone()))
}

/// True when the CUDA driver library can be opened (it says nothing about devices).
pub fn driver_available() -> bool {
    driver().is_ok()
}

fn load_driver() -> std::result::Result<Driver, String> {
    // SAFETY: dlopen/dlsym with valid C strings; each symbol is cast to the signature the
    // CUDA driver API documents for it (the `_v2` names are what the `cuda.h` macros use).
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err(
                "the CUDA driver (libcuda.so.1) cannot be opened: no NVIDIA driver here".into(),
            );
        }
        let sym = |name: &CStr| {
            let p = libc::dlsym(lib, name.as_ptr());
            if p.is_null() {
                Err(format!("libcuda.so.1 has no {}", name.to_string_lossy()))
            } else {
                Ok(p)
            }
        };
        Ok(Driver {
            launch_host_func: std::mem::transmute::<*mut c_void, LaunchHostFunc>(sym(
                c"cuLaunchHostFunc",
            )?),
            mem_host_register: std::mem::transmute::<*mut c_void, MemHostRegister>(sym(
                c"cuMemHostRegister_v2",
            )?),
            mem_host_unregister: std::mem::transmute::<*mut c_void, MemHostUnregister>(sym(
                c"cuMemHostUnregister",
            )?),
            ctx_get_current: std::mem::transmute::<*mut c_void, CtxGetCurrent>(sym(
                c"cuCtxGetCurrent",
            )?),
            get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(sym(
                c"cuGetErrorString",
            )?),
            memops: match (
                sym(c"cuStreamWriteValue32_v2"),
                sym(c"cuStreamWaitValue32_v2"),
                sym(c"cuMemHostGetDevicePointer_v2"),
            ) {
                (Ok(w), Ok(v), Ok(p)) => Some((
                    std::mem::transmute::<*mut c_void, StreamValue32>(w),
                    std::mem::transmute::<*mut c_void, StreamValue32>(v),
                    std::mem::transmute::<*mut c_void, MemHostGetDevicePointer>(p),
                )),
                _ => None,
            },
        })
    }
}

fn check(d: &Driver, code: CuResult, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let mut msg: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    unsafe { (d.get_error_string)(code, &mut msg) };
    let text = if msg.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: a NUL-terminated static string from the driver.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    };
    Err(KtrsError::System(format!(
        "{what} failed: CUDA error {code} ({text})"
    )))
}

/// Page-locked host memory, registered with the CUDA driver so that stream copies to and
/// from it are asynchronous and can be captured in a graph. Zero-initialised.
pub struct PinnedBlock {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain memory; who reads and writes it when is ordered by the stream (copies and
// the host function run one after another), as for any pinned buffer.
unsafe impl Send for PinnedBlock {}
unsafe impl Sync for PinnedBlock {}

impl PinnedBlock {
    /// At least `bytes` bytes, page aligned. Needs a current CUDA context on this thread
    /// (the one torch made when it first used the GPU).
    pub fn new(bytes: usize) -> Result<PinnedBlock> {
        Self::register(bytes, REGISTER_PORTABLE)
    }

    fn register(bytes: usize, flags: u32) -> Result<PinnedBlock> {
        let d = driver()?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: cuCtxGetCurrent writes one pointer.
        check(
            d,
            unsafe { (d.ctx_get_current)(&mut ctx) },
            "cuCtxGetCurrent",
        )?;
        if ctx.is_null() {
            return Err(KtrsError::System(
                "no current CUDA context on this thread: use the GPU from torch first".into(),
            ));
        }
        let bytes = bytes.max(1).div_ceil(4096) * 4096;
        // SAFETY: anonymous private mapping of `bytes` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KtrsError::System(format!(
                "cannot map {bytes} bytes of host memory"
            )));
        }
        // SAFETY: p..p+bytes is our mapping.
        if let Err(e) = check(
            d,
            unsafe { (d.mem_host_register)(p, bytes, flags) },
            "cuMemHostRegister",
        ) {
            unsafe { libc::munmap(p, bytes) };
            return Err(e);
        }
        Ok(PinnedBlock {
            ptr: p as *mut u8,
            bytes,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            // SAFETY: the block was registered in `new`; a failure only leaks the pinning.
            unsafe { (d.mem_host_unregister)(self.ptr as *mut c_void) };
        }
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut c_void, self.bytes) };
    }
}

type Job = Box<dyn FnMut() + Send>;

/// Where the driver finds a [`HostFn`]'s closure. It is leaked on purpose (a few dozen
/// bytes per `HostFn`): a captured graph may run the host node after the `HostFn` is
/// gone, and then the node must find an empty slot, not freed memory.
struct Slot {
    job: Mutex<Option<Job>>,
}

/// A closure that CUDA streams (and graphs captured from them) run on a driver thread.
///
/// Dropping it waits for a run in progress, then empties its slot: later runs of nodes
/// already enqueued or captured do nothing.
pub struct HostFn {
    slot: &'static Slot,
}

impl HostFn {
    pub fn new(job: impl FnMut() + Send + 'static) -> HostFn {
        let slot = Box::leak(Box::new(Slot {
            job: Mutex::new(Some(Box::new(job))),
        }));
        HostFn { slot }
    }

    /// Enqueues (or, under stream capture, records) one run of the closure on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live `CUstream` of this process (e.g. torch's
    /// `torch.cuda.current_stream().cuda_stream`), or null for the legacy default stream.
    pub unsafe fn launch(&self, stream: *mut c_void) -> Result<()> {
        let d = driver()?;
        let data = self.slot as *const Slot as *mut c_void;
        check(
            d,
            (d.launch_host_func)(stream, run_slot, data),
            "cuLaunchHostFunc",
        )
    }
}

impl Drop for HostFn {
    fn drop(&mut self) {
        let job = self
            .slot
            .job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(job);
    }
}

unsafe extern "C" fn run_slot(data: *mut c_void) {
    // SAFETY: `data` is a leaked `Slot` (see `HostFn::launch`); it is never freed.
    let slot = &*(data as *const Slot);
    // A panic must not unwind into the driver; the closure reports its own errors.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A job that panicked before ran to its end as far as the lock is concerned.
        let mut job = slot.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = job.as_mut() {
            f();
        }
    }));
}

/// Where a [`StreamChannel`]'s two flag words live. Separate cache lines, so the GPU's
/// polling of `done` does not contend with the CPU's of `go`.
const GO: usize = 0;
const DONE: usize = 16;

/// A faster hand-off than a host function: the stream writes a job id into a flag word in
/// mapped host memory (`cuStreamWriteValue32`), a Rust thread spinning on that word runs the
/// job and writes the id back into a second word, and the stream waits for it
/// (`cuStreamWaitValue32`), then clears it. Both are stream operations, so CUDA graphs
/// capture them like kernels. No driver thread and no callback are involved: on the
/// reference machine a host node cost ~55 µs per call before the job even started.
///
/// One channel serves one stream at a time (jobs run one after another: a decode step
/// calls them layer by layer). While inactive the thread polls every millisecond rather
/// than spinning; it never stops answering while a job exists, so a replayed graph cannot
/// wait forever on a channel that went to sleep.
pub struct StreamChannel {
    inner: Arc<ChannelInner>,
}

struct ChannelInner {
    flags: FlagWords,
    go_dev: u64,
    done_dev: u64,
    jobs: Mutex<HashMap<u32, Arc<Mutex<Job>>>>,
    next_id: AtomicU32,
    active: AtomicBool,
    /// Set when the `StreamChannel` handle is dropped; the thread ends once no job is left.
    closing: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The flag words: pinned mapped memory for CUDA, or plain memory in tests.
enum FlagWords {
    Pinned(PinnedBlock),
    #[cfg(test)]
    Heap(Box<[AtomicU32; 32]>),
}

impl FlagWords {
    fn word(&self, i: usize) -> &AtomicU32 {
        match self {
            // SAFETY: the block is page sized and aligned, so index i < 32 is in bounds and
            // aligned; AtomicU32 has the layout of u32.
            FlagWords::Pinned(b) => unsafe { &*(b.as_ptr() as *const AtomicU32).add(i) },
            #[cfg(test)]
            FlagWords::Heap(w) => &w[i],
        }
    }
}

impl StreamChannel {
    /// Needs the CUDA driver with stream memory operations and a current context.
    pub fn new() -> Result<StreamChannel> {
        let d = driver()?;
        let (_, _, dev_ptr) = d.memops.ok_or_else(|| {
            KtrsError::System("this CUDA driver has no stream memory operations".into())
        })?;
        let block = PinnedBlock::register(4096, REGISTER_PORTABLE | REGISTER_DEVICEMAP)?;
        let mut dev = 0u64;
        // SAFETY: the block is registered with DEVICEMAP; one u64 is written.
        check(
            d,
            unsafe { dev_ptr(&mut dev, block.as_ptr() as *mut c_void, 0) },
            "cuMemHostGetDevicePointer",
        )?;
        Ok(Self::start(FlagWords::Pinned(block), dev))
    }

    fn start(flags: FlagWords, dev: u64) -> StreamChannel {
        let inner = Arc::new(ChannelInner {
            flags,
            go_dev: dev + (GO * 4) as u64,
            done_dev: dev + (DONE * 4) as u64,
            jobs: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            active: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let me = inner.clone();
        let handle = std::thread::Builder::new()
            .name("ktrs-stream".into())
            .spawn(move || me.serve())
            .ok();
        *inner.thread.lock().unwrap_or_else(|e| e.into_inner()) = handle;
        StreamChannel { inner }
    }

    /// True where the driver offers what a channel needs (says nothing about devices).
    pub fn available() -> bool {
        driver().is_ok_and(|d| d.memops.is_some())
    }

    /// Spin (active: a decode is running) or poll every millisecond (idle).
    pub fn set_active(&self, on: bool) {
        self.inner.active.store(on, Ordering::SeqCst);
    }

    /// Registers `job`; the returned handle launches it and unregisters it when dropped.
    pub fn add(&self, job: impl FnMut() + Send + 'static) -> ChannelJob {
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(Mutex::new(Box::new(job) as Job)));
        ChannelJob {
            inner: self.inner.clone(),
            id,
        }
    }
}

impl Drop for StreamChannel {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::SeqCst);
    }
}

impl ChannelInner {
    fn serve(&self) {
        // The caller's core: the experts' workers have the others.
        if let Some(core) = crate::pool::caller_core() {
            crate::pool::pin_current_thread(core);
        }
        let (go, done) = (self.flags.word(GO), self.flags.word(DONE));
        let mut idle_since = std::time::Instant::now();
        loop {
            let id = go.load(Ordering::Acquire);
            if id != 0 {
                go.store(0, Ordering::Relaxed);
                let job = self
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned();
                if let Some(job) = job {
                    // A job reports its own errors; a panic must not stop the thread (the
                    // stream would wait forever for `done`).
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        (job.lock().unwrap_or_else(|e| e.into_inner()))();
                    }));
                }
                // The job's writes (the output) happen before this store (Release).
                done.store(id, Ordering::Release);
                idle_since = std::time::Instant::now();
                continue;
            }
            if self.closing.load(Ordering::Relaxed)
                && self
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            {
                return;
            }
            // Within a decode step the next layer comes a few hundred µs later: spin. Between
            // steps Python runs, maybe on this core: spin politely (yield). Idle: sleep.
            if idle_since.elapsed().as_micros() < 1000 {
                std::hint::spin_loop();
            } else if self.active.load(Ordering::Relaxed) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

type Memops = (StreamValue32, StreamValue32, MemHostGetDevicePointer);

fn memops() -> Result<(&'static Driver, Memops)> {
    let d = driver()?;
    let m = d
        .memops
        .ok_or_else(|| KtrsError::System("no stream memory operations".into()))?;
    Ok((d, m))
}

/// One job of a [`StreamChannel`].
pub struct ChannelJob {
    inner: Arc<ChannelInner>,
    id: u32,
}

impl ChannelJob {
    /// Enqueues (or, under stream capture, records) one run of the job on `stream`:
    /// write `go = id`, wait until `done == id`, clear `done`.
    ///
    /// # Safety
    /// `stream` must be a live `CUstream` of this process (see [`HostFn::launch`]).
    pub unsafe fn launch(&self, stream: *mut c_void) -> Result<()> {
        self.submit(stream)?;
        self.finish(stream)
    }

    /// The first half of [`launch`](Self::launch): `go = id`. Stream work enqueued
    /// between `submit` and `finish` (the shared experts) overlaps the job.
    ///
    /// # Safety
    /// As for `launch`; every `submit` must be followed by a `finish` on the same stream.
    pub unsafe fn submit(&self, stream: *mut c_void) -> Result<()> {
        let (d, (write, _, _)) = memops()?;
        check(
            d,
            write(stream, self.inner.go_dev, self.id, 0),
            "cuStreamWriteValue32",
        )
    }

    /// The second half: wait until `done == id`, then clear `done`.
    ///
    /// # Safety
    /// As for `launch`.
    pub unsafe fn finish(&self, stream: *mut c_void) -> Result<()> {
        let (d, (write, wait, _)) = memops()?;
        let c = &self.inner;
        check(
            d,
            wait(stream, c.done_dev, self.id, WAIT_EQ),
            "cuStreamWaitValue32",
        )?;
        check(d, write(stream, c.done_dev, 0, 0), "cuStreamWriteValue32")
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for ChannelJob {
    fn drop(&mut self) {
        let job = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        // Wait for a run in progress before the job's captures (staging memory) go.
        if let Some(job) = job {
            drop(job.lock());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_fn_runs_until_dropped_without_cuda() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let f = HostFn::new(move || {
            m.fetch_add(1, Ordering::SeqCst);
        });
        let data = f.slot as *const Slot as *mut c_void;
        // What the driver does for an enqueued node, twice, then once after the drop.
        unsafe { run_slot(data) };
        unsafe { run_slot(data) };
        assert_eq!(n.load(Ordering::SeqCst), 2);
        drop(f);
        unsafe { run_slot(data) };
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_job_does_not_unwind_into_the_caller() {
        let f = HostFn::new(|| panic!("boom"));
        unsafe { run_slot(f.slot as *const Slot as *mut c_void) };
        // The slot's lock is poisoned by the panic; dropping must still work.
        drop(f);
    }

    /// The GPU's side of the protocol, played by a test thread on plain memory.
    fn play_stream(c: &StreamChannel, job: &ChannelJob) {
        let (go, done) = (c.inner.flags.word(GO), c.inner.flags.word(DONE));
        go.store(job.id(), Ordering::Release);
        let t0 = std::time::Instant::now();
        while done.load(Ordering::Acquire) != job.id() {
            assert!(t0.elapsed().as_secs() < 10, "channel never answered");
            std::hint::spin_loop();
        }
        done.store(0, Ordering::Relaxed);
    }

    #[test]
    fn channel_runs_the_job_named_by_the_stream_and_answers_even_after_drop() {
        use std::sync::atomic::AtomicUsize;
        let c = StreamChannel::start(
            FlagWords::Heap(Box::new([const { AtomicU32::new(0) }; 32])),
            0,
        );
        let hits = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (h0, h1) = (hits.clone(), hits.clone());
        let a = c.add(move || {
            h0[0].fetch_add(1, Ordering::SeqCst);
        });
        let b = c.add(move || {
            h1[1].fetch_add(1, Ordering::SeqCst);
            panic!("a failing job must not stop the channel");
        });
        c.set_active(true);
        for _ in 0..3 {
            play_stream(&c, &a);
            play_stream(&c, &b);
        }
        assert_eq!(hits[0].load(Ordering::SeqCst), 3);
        assert_eq!(hits[1].load(Ordering::SeqCst), 3);
        // An unregistered id (a stale graph node) is still answered, so nothing hangs;
        // so is a call while the channel idles (it polls).
        let stale_id = b.id();
        drop(b);
        c.set_active(false);
        let stale = ChannelJob {
            inner: c.inner.clone(),
            id: stale_id,
        };
        play_stream(&c, &stale);
        std::mem::forget(stale); // not a registered job: nothing to unregister
        assert_eq!(hits[1].load(Ordering::SeqCst), 3);
        play_stream(&c, &a);
        assert_eq!(hits[0].load(Ordering::SeqCst), 4);
        // The thread ends once the handle and every job are gone.
        let inner = c.inner.clone();
        drop(c);
        drop(a);
        let handle = inner.thread.lock().unwrap().take().expect("thread started");
        handle.join().unwrap();
    }

    #[test]
    fn without_a_driver_pinning_is_an_error_not_a_crash() {
        if driver_available() {
            eprintln!("skipped: a CUDA driver is present (the Python CUDA tests cover pinning)");
            return;
        }
        assert!(matches!(PinnedBlock::new(64), Err(KtrsError::System(_))));
        assert!(!StreamChannel::available());
        assert!(matches!(StreamChannel::new(), Err(KtrsError::System(_))));
    }
}
