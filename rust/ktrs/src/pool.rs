//! A persistent worker pool: one job at a time, tasks handed out by an atomic counter.
//!
//! Why not rayon: a decode step issues ~50 small parallel regions per token; workers here
//! spin briefly before sleeping so back-to-back regions do not pay a futex wake-up each,
//! the calling thread does work too (so `threads = N` means N busy cores, none of them
//! fighting the caller), and every job carries a worker index for per-worker scratch.
//!
//! Jobs are serialised by a mutex: two Python threads (or two models) calling into ktrs
//! at once take turns rather than interleave on shared scratch memory.

use crate::error::{KtrsError, Result};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type TaskFn<'a> = dyn Fn(usize, usize) + Sync + 'a;

struct Shared {
    job: Mutex<Option<JobSlot>>,
    wake: Condvar,
    /// Bumped for every job so sleeping workers can tell a new job from a spurious wake.
    generation: AtomicUsize,
    open: AtomicBool,
    next_task: AtomicUsize,
    /// Workers currently inside the open job.
    active: AtomicUsize,
    shutdown: AtomicBool,
    /// The payload of the first task that panicked; `run` re-raises it on the caller, so
    /// what the panic carried (e.g. [`crate::buffer::AllocFailure`]) survives.
    panicked: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The open job: task function and task count. The function's lifetime is erased: the
/// job is only reachable while `open` is set, and `run` does not return before every
/// worker that saw it open has left (see `active`).
#[derive(Clone, Copy)]
struct JobSlot(*const TaskFn<'static>, usize);
// SAFETY: the pointee is `Sync`, and its lifetime is guarded as described above.
unsafe impl Send for JobSlot {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    owner_pid: u32,
    run_lock: Mutex<()>,
}

/// Most threads a pool may have. More than the cores of any machine ktrs targets; the
/// bound turns `threads=10**6` into a clear error instead of a failed spawn half-way.
pub const MAX_THREADS: usize = 1024;

/// `threads` if it is a usable thread count, else an error naming `arg`.
pub fn check_threads(arg: &str, threads: usize) -> Result<usize> {
    if (1..=MAX_THREADS).contains(&threads) {
        Ok(threads)
    } else {
        Err(KtrsError::invalid(
            arg,
            format!("a thread count from 1 to {MAX_THREADS}"),
            threads,
        ))
    }
}

impl ThreadPool {
    /// A pool of `threads` busy threads in all: the caller plus `threads - 1` workers.
    /// With `pin`, worker i is bound to the (i+1)-th allowed physical core, leaving the
    /// first one to the caller. If the OS refuses a worker, the ones already started are
    /// stopped and joined before the error returns.
    pub fn new(threads: usize, pin: bool) -> Result<ThreadPool> {
        let threads = check_threads("threads", threads)?;
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            wake: Condvar::new(),
            generation: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            next_task: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: Mutex::new(None),
        });
        let cores = if pin { pin_targets() } else { Vec::new() };
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(threads - 1),
            threads,
            owner_pid: std::process::id(),
            run_lock: Mutex::new(()),
        };
        for w in 1..threads {
            let s = pool.shared.clone();
            let cpu = if cores.len() >= threads {
                Some(cores[w])
            } else {
                None
            };
            let spawned = std::thread::Builder::new()
                .name(format!("ktrs-worker-{w}"))
                .spawn(move || worker_loop(s, w, cpu));
            match spawned {
                Ok(handle) => pool.workers.push(handle),
                // Dropping `pool` shuts down and joins the workers started so far.
                Err(e) => {
                    return Err(KtrsError::System(format!(
                        "cannot start worker thread {w} of {threads}: {e}"
                    )))
                }
            }
        }
        Ok(pool)
    }

    /// A process-wide pool per thread count, shared by every layer that asks for it.
    pub fn shared(threads: usize) -> Result<Arc<ThreadPool>> {
        static POOLS: OnceLock<Mutex<HashMap<usize, Weak<ThreadPool>>>> = OnceLock::new();
        let mut map = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&threads).and_then(Weak::upgrade) {
            if p.owner_pid == std::process::id() {
                return Ok(p);
            }
        }
        let pin = std::env::var("KTRS_PIN").map(|v| v != "0").unwrap_or(true);
        let p = Arc::new(ThreadPool::new(threads, pin)?);
        map.insert(threads, Arc::downgrade(&p));
        Ok(p)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(task, worker)` for every task in `0..n_tasks`; `worker < self.threads()`
    /// and no two concurrently running calls share a worker index.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, n_tasks: usize, f: F) {
        if n_tasks == 0 {
            return;
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // After fork() the workers do not exist in the child: run inline.
        if self.threads == 1 || n_tasks == 1 || std::process::id() != self.owner_pid {
            for t in 0..n_tasks {
                f(t, 0);
            }
            return;
        }
        let s = &*self.shared;
        let dyn_f: &TaskFn<'_> = &f;
        // SAFETY: lifetime erasure; see `JobSlot`. We wait for all workers below.
        let ptr: *const TaskFn<'static> =
            unsafe { std::mem::transmute(dyn_f as *const TaskFn<'_>) };
        {
            let mut slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(JobSlot(ptr, n_tasks));
            s.next_task.store(0, SeqCst);
            s.open.store(true, SeqCst);
            s.generation.fetch_add(1, SeqCst);
        }
        s.wake.notify_all();
        let caller =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drain(s, ptr, n_tasks, 0)));
        s.open.store(false, SeqCst);
        while s.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(p) = caller {
            std::panic::resume_unwind(p);
        }
        let worker_panic = s.panicked.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = worker_panic {
            std::panic::resume_unwind(p);
        }
    }
}

fn drain(s: &Shared, f: *const TaskFn<'static>, n_tasks: usize, worker: usize) {
    loop {
        let t = s.next_task.fetch_add(1, Relaxed);
        if t >= n_tasks {
            break;
        }
        // SAFETY: the job is open, so `f` is alive (see `JobSlot`).
        unsafe { (*f)(t, worker) };
    }
}

fn worker_loop(s: Arc<Shared>, worker: usize, cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin_current_thread(c);
    }
    let mut seen = 0usize;
    loop {
        // Spin a little, then sleep until a new generation or shutdown.
        let start = Instant::now();
        let spin = Duration::from_micros(crate::tuning::get(crate::tuning::Knob::SpinUs) as u64);
        while s.generation.load(Acquire) == seen && !s.shutdown.load(Relaxed) {
            if start.elapsed() > spin {
                let guard = s.job.lock().unwrap_or_else(|e| e.into_inner());
                let _g = s
                    .wake
                    .wait_while(guard, |_| {
                        s.generation.load(Acquire) == seen && !s.shutdown.load(Relaxed)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                break;
            }
            std::hint::spin_loop();
        }
        if s.shutdown.load(Relaxed) {
            return;
        }
        seen = s.generation.load(Acquire);
        s.active.fetch_add(1, SeqCst);
        if s.open.load(SeqCst) {
            let slot = *s.job.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(JobSlot(f, n)) = slot {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    drain(&s, f, n, worker)
                }));
                if let Err(p) = r {
                    s.panicked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(p);
                }
            }
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        if std::process::id() == self.owner_pid {
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

/// The core the pools leave to the thread that calls them (the first allowed physical
/// core), unless `KTRS_PIN=0`: a thread that calls pools all the time (the decode
/// channel) pins itself there.
pub fn caller_core() -> Option<usize> {
    if std::env::var("KTRS_PIN").is_ok_and(|v| v == "0") {
        return None;
    }
    pin_targets().first().copied()
}

/// One logical CPU per physical core, in order, from the allowed set.
fn pin_targets() -> Vec<usize> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for cpu in crate::cpu::allowed_cpus() {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let pkg =
            std::fs::read_to_string(format!("{base}/physical_package_id")).unwrap_or_default();
        let core =
            std::fs::read_to_string(format!("{base}/core_id")).unwrap_or_else(|_| cpu.to_string());
        if seen.insert((pkg.trim().to_string(), core.trim().to_string())) {
            out.push(cpu);
        }
    }
    out
}

pub(crate) fn pin_current_thread(cpu: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain libc calls on a zeroed cpu_set_t; failure only means no pinning.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// `KTRS_THREADS` if set: an error when it is not a thread count (`0`, `-1` and `abc` are
/// mistakes to report, not to ignore), `None` when unset or empty.
pub fn env_threads() -> Result<Option<usize>> {
    match std::env::var("KTRS_THREADS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) => check_threads("KTRS_THREADS", n).map(Some),
            Err(_) => Err(KtrsError::invalid(
                "KTRS_THREADS",
                format!("a thread count from 1 to {MAX_THREADS}"),
                format!("{v:?}"),
            )),
        },
        _ => Ok(None),
    }
}

/// The thread count a layer uses: `requested`, else `KTRS_THREADS`, else one per
/// physical core; an error if the chosen value is not a usable thread count.
pub fn resolve_threads(requested: Option<usize>) -> Result<usize> {
    match requested {
        Some(n) => check_threads("threads", n),
        None => Ok(
            env_threads()?.unwrap_or_else(|| crate::cpu::physical_cores().clamp(1, MAX_THREADS))
        ),
    }
}

/// Default thread count: `KTRS_THREADS` if set and valid, else one per physical core.
pub fn default_threads() -> usize {
    resolve_threads(None).unwrap_or_else(|_| crate::cpu::physical_cores().clamp(1, MAX_THREADS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3, 8] {
            let pool = ThreadPool::new(threads, false).unwrap();
            for n in [1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.run(n, |t, w| {
                    assert!(w < threads);
                    hits[t].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
            }
        }
    }

    #[test]
    fn back_to_back_and_after_sleep() {
        let pool = ThreadPool::new(4, false).unwrap();
        let sum = AtomicU64::new(0);
        for i in 0..200 {
            if i == 100 {
                std::thread::sleep(Duration::from_millis(5)); // workers park
            }
            pool.run(16, |t, _| {
                sum.fetch_add(t as u64, Relaxed);
            });
        }
        assert_eq!(sum.load(Relaxed), 200 * 120);
    }

    #[test]
    fn panics_propagate_and_pool_survives() {
        let pool = ThreadPool::new(3, false).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |t, _| {
                if t == 33 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let c = AtomicU64::new(0);
        pool.run(10, |_, _| {
            c.fetch_add(1, Relaxed);
        });
        assert_eq!(c.load(Relaxed), 10);
    }

    #[test]
    fn thread_counts_are_bounded_and_zero_is_refused() {
        for bad in [0, MAX_THREADS + 1, 1_000_000] {
            let e = ThreadPool::new(bad, false).err().expect("refused");
            assert!(e.to_string().contains("thread count from 1 to"), "{e}");
        }
        assert!(ThreadPool::shared(0).is_err());
        assert_eq!(resolve_threads(Some(3)).unwrap(), 3);
        assert!(resolve_threads(Some(0)).is_err());
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_with_its_payload() {
        let pool = ThreadPool::new(4, false).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |t, _| {
                if t == 40 {
                    crate::buffer::alloc_failed(123);
                }
            })
        }));
        let p = r.expect_err("panicked");
        assert_eq!(
            p.downcast_ref::<crate::buffer::AllocFailure>(),
            Some(&crate::buffer::AllocFailure { bytes: 123 })
        );
    }

    #[test]
    fn concurrent_callers_serialise() {
        let pool = Arc::new(ThreadPool::new(3, false).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let c = AtomicU64::new(0);
                    for _ in 0..50 {
                        p.run(9, |_, _| {
                            c.fetch_add(1, Relaxed);
                        });
                    }
                    c.load(Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 450);
        }
    }
}
