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
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

type CuResult = i32;
type HostCallback = unsafe extern "C" fn(*mut c_void);

type LaunchHostFunc = unsafe extern "C" fn(*mut c_void, HostCallback, *mut c_void) -> CuResult;
type MemHostRegister = unsafe extern "C" fn(*mut c_void, usize, u32) -> CuResult;
type MemHostUnregister = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CtxGetCurrent = unsafe extern "C" fn(*mut *mut c_void) -> CuResult;
type GetErrorString = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;

/// The few driver entry points the host path needs.
struct Driver {
    launch_host_func: LaunchHostFunc,
    mem_host_register: MemHostRegister,
    mem_host_unregister: MemHostUnregister,
    ctx_get_current: CtxGetCurrent,
    get_error_string: GetErrorString,
}

/// `CU_MEMHOSTREGISTER_PORTABLE`: pinned for every context, not only the current one.
const REGISTER_PORTABLE: u32 = 1;

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
            unsafe { (d.mem_host_register)(p, bytes, REGISTER_PORTABLE) },
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
        if let Ok(mut job) = slot.job.lock() {
            if let Some(f) = job.as_mut() {
                f();
            }
        }
    }));
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

    #[test]
    fn without_a_driver_pinning_is_an_error_not_a_crash() {
        if driver_available() {
            eprintln!("skipped: a CUDA driver is present (the Python CUDA tests cover pinning)");
            return;
        }
        assert!(matches!(PinnedBlock::new(64), Err(KtrsError::System(_))));
    }
}
