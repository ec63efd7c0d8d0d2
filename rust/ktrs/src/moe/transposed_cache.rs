//! Transposed expert weights kept across backward calls, within a process-wide budget.
//!
//! The backward multiplies by the transposed expert weights (`transposed.rs`); without
//! this cache every call repacks each task's block again, one extra read and write of
//! all active expert weights per backward. Here each (matrix, expert) gets, on first
//! use, one block of memory the size of the expert's packed matrix, holding the whole
//! transposed matrix: the transposed block of columns `c0 .. c0 + 16·np` is exactly
//! panels `c0/16 ..` of it (`pack::pack_transposed_block`), whatever `np` a call picks.
//! Each 16-column panel has a state (empty, being filled, ready): a task claims the
//! panels of its block that are empty, fills them with `kernels::transpose_block`
//! (the same bytes the per-call repack produces, on every ISA) and marks them ready;
//! later calls use them as they are. Pool threads fill concurrently without a lock;
//! a block with a panel another thread is filling falls back to the per-call repack.
//!
//! Memory: owned by the layer (freed when it drops, or for one expert by `set_expert`),
//! counted against a [`CacheBudget`] shared by all layers (`KTRS_TRANSPOSED_CACHE_MB`,
//! default a quarter of physical memory; 0 turns the cache off). An expert's block is
//! allocated only when the budget admits it, the OS has memory to spare (`MemAvailable`
//! stays above 1/16 of physical memory: Linux overcommits, so a successful allocation
//! alone does not rule out the OOM killer) and the allocation succeeds; otherwise the
//! backward repacks as before. Only the backward fills it.

use crate::buffer::Buffer;
use crate::cpu::Isa;
use crate::kernels;
use crate::pack::{ExpertPack, PackShape, PANEL};
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Bytes all transposed caches of a process may hold together.
pub struct CacheBudget {
    used: AtomicUsize,
    /// Fixed limit in bytes; `None`: `KTRS_TRANSPOSED_CACHE_MB`, read at every reservation.
    limit: Option<usize>,
}

impl CacheBudget {
    /// The budget every layer uses unless given another.
    pub fn global() -> Arc<CacheBudget> {
        static G: OnceLock<Arc<CacheBudget>> = OnceLock::new();
        G.get_or_init(|| {
            Arc::new(CacheBudget {
                used: AtomicUsize::new(0),
                limit: None,
            })
        })
        .clone()
    }

    /// A budget of its own with a fixed limit, which alone decides (no `MemAvailable`
    /// check: tests and probes get the same cache on every machine).
    pub fn with_limit(bytes: usize) -> Arc<CacheBudget> {
        Arc::new(CacheBudget {
            used: AtomicUsize::new(0),
            limit: Some(bytes),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.unwrap_or_else(|| {
            crate::tuning::get(crate::tuning::Knob::TransposedCacheMb).saturating_mul(1 << 20)
        })
    }

    /// Bytes held by all caches counted here.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Default of `KTRS_TRANSPOSED_CACHE_MB`: a quarter of physical memory, 0 if unknown.
pub fn default_budget_mb() -> usize {
    physical_memory_bytes() / 4 / (1 << 20)
}

/// `MemTotal` or `MemAvailable` of /proc/meminfo-formatted text, in bytes.
fn meminfo_field(text: &str, field: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Whether the OS can spare `bytes` more: Linux overcommits, so an allocation that
/// succeeds may still bring the OOM killer when its pages are touched. The cache takes
/// memory only while `MemAvailable` (read at most every 100 ms) stays above 1/16 of
/// physical memory afterwards; where it is unknown, the budget alone decides.
fn os_can_spare(bytes: usize) -> bool {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<(Instant, Option<usize>)>> = Mutex::new(None);
    let avail = {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((t, v)) if t.elapsed() < Duration::from_millis(100) => v,
            _ => {
                let v = std::fs::read_to_string("/proc/meminfo")
                    .ok()
                    .and_then(|s| meminfo_field(&s, "MemAvailable"));
                *last = Some((Instant::now(), v));
                v
            }
        }
    };
    match avail {
        Some(a) => a.saturating_sub(bytes) >= physical_memory_bytes() / 16,
        None => true,
    }
}

fn physical_memory_bytes() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return (pages as usize).saturating_mul(size as usize);
        }
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| meminfo_field(&s, "MemTotal"))
        .unwrap_or(0)
}

const EMPTY: u8 = 0;
const FILLING: u8 = 1;
const READY: u8 = 2;

/// One expert's transposed matrix and the state of each of its 16-column panels.
struct Entry {
    data: Buffer<u16>,
    state: Box<[AtomicU8]>,
}

/// The cached transposed blocks of one packed matrix (all experts).
pub(super) struct MatrixCache {
    shape: PackShape,
    slots: Box<[AtomicPtr<Entry>]>,
    budget: Arc<CacheBudget>,
    bytes: AtomicUsize,
}

// Send + Sync come from the atomics; what makes sharing sound: panel memory is written
// only by the thread that claimed the panel (EMPTY -> FILLING) and read only after
// READY (Acquire), and entries are freed only through `&mut self`.
const _: () = {
    const fn sync<T: Send + Sync>() {}
    sync::<MatrixCache>()
};

impl MatrixCache {
    pub(super) fn new(pack: &ExpertPack, budget: Arc<CacheBudget>) -> MatrixCache {
        MatrixCache {
            shape: pack.shape,
            slots: (0..pack.experts)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            budget,
            bytes: AtomicUsize::new(0),
        }
    }

    /// Bytes of transposed weights held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn entry_bytes(&self) -> usize {
        self.shape.len() * 2
    }

    /// Expert e's entry, made now if the budget and the allocator allow.
    fn entry(&self, e: usize) -> Option<&Entry> {
        let slot = &self.slots[e];
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: entries live until `clear_expert`/drop, which take `&mut self`.
            return Some(unsafe { &*p });
        }
        let bytes = self.entry_bytes();
        if !self.budget.try_reserve(bytes) {
            return None;
        }
        if self.budget.limit.is_none() && !os_can_spare(bytes) {
            self.budget.release(bytes);
            return None;
        }
        let data = match Buffer::<u16>::try_zeroed("a transposed cache block", self.shape.len()) {
            Ok(d) => d,
            Err(_) => {
                self.budget.release(bytes);
                return None;
            }
        };
        let state = (0..self.shape.k_pad / PANEL)
            .map(|_| AtomicU8::new(EMPTY))
            .collect();
        let new = Box::into_raw(Box::new(Entry { data, state }));
        match slot.compare_exchange(
            std::ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
                // SAFETY: just installed; lives as above.
                Some(unsafe { &*new })
            }
            Err(cur) => {
                // Another thread installed one first: use it, give ours back.
                // SAFETY: `new` was never shared.
                drop(unsafe { Box::from_raw(new) });
                self.budget.release(bytes);
                // SAFETY: as above.
                Some(unsafe { &*cur })
            }
        }
    }

    /// The transposed block of expert e for the 16·np columns from `c0` (what
    /// `kernels::transpose_block` writes), filled from `pack` where not yet cached; `None`
    /// when the cache is off, over budget, or another thread is filling part of it.
    pub(super) fn block(
        &self,
        isa: Isa,
        pack: &ExpertPack,
        e: usize,
        c0: usize,
        np: usize,
    ) -> Option<&[u16]> {
        debug_assert_eq!(pack.shape, self.shape);
        debug_assert!(c0.is_multiple_of(PANEL) && c0 + np * PANEL <= self.shape.k_pad);
        if self.budget.limit() == 0 {
            return None;
        }
        let entry = self.entry(e)?;
        let p0 = c0 / PANEL;
        let panels = p0..p0 + np;
        let len = PANEL * self.shape.n_pad;
        let base = entry.data.as_ptr();
        let ready = |p: usize| entry.state[p].load(Ordering::Acquire) == READY;
        if !panels.clone().all(ready) {
            // Claim the empty panels; give up if another thread is filling one.
            let mut claimed: Vec<usize> = Vec::with_capacity(np);
            for p in panels.clone() {
                match entry.state[p].compare_exchange(
                    EMPTY,
                    FILLING,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => claimed.push(p),
                    Err(READY) => {}
                    Err(_) => {
                        for &q in &claimed {
                            entry.state[q].store(EMPTY, Ordering::Release);
                        }
                        return None;
                    }
                }
            }
            // Fill each run of consecutive claimed panels with one transpose.
            let mut i = 0;
            while i < claimed.len() {
                let mut j = i + 1;
                while j < claimed.len() && claimed[j] == claimed[j - 1] + 1 {
                    j += 1;
                }
                let (a, n) = (claimed[i], j - i);
                // SAFETY: panels a..a+n are inside the entry's buffer (len per panel,
                // k_pad/16 panels) and claimed by this thread alone (FILLING): nobody
                // else reads or writes them until they are marked READY.
                let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a * len), n * len) };
                kernels::transpose_block(isa, pack.expert(e), self.shape, a * PANEL, n, dst);
                i = j;
            }
            for &p in &claimed {
                entry.state[p].store(READY, Ordering::Release);
            }
        }
        // SAFETY: every panel of the block is READY: written once, never again while the
        // entry lives (only `&mut self` methods free or reset it).
        Some(unsafe { std::slice::from_raw_parts(base.add(p0 * len), np * len) })
    }

    /// Frees expert e's entry (its packed weights are about to change).
    pub(super) fn clear_expert(&mut self, e: usize) {
        let p = std::mem::replace(self.slots[e].get_mut(), std::ptr::null_mut());
        if !p.is_null() {
            // SAFETY: installed by `entry` from Box::into_raw; `&mut self` means no
            // reference into it is alive.
            drop(unsafe { Box::from_raw(p) });
            let bytes = self.entry_bytes();
            *self.bytes.get_mut() -= bytes;
            self.budget.release(bytes);
        }
    }

    pub(super) fn clear(&mut self) {
        for e in 0..self.slots.len() {
            self.clear_expert(e);
        }
    }
}

impl Drop for MatrixCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(experts: usize, n: usize, k: usize) -> ExpertPack {
        let mut p = ExpertPack::zeroed(experts, PackShape::new(n, k));
        for e in 0..experts {
            for (i, v) in p.expert_mut(e).iter_mut().enumerate() {
                *v = (i as u16).wrapping_mul(31).wrapping_add(e as u16 * 7 + 1);
            }
        }
        p
    }

    fn want(p: &ExpertPack, e: usize, c0: usize, np: usize) -> Vec<u16> {
        let mut v = vec![0u16; np * PANEL * p.shape.n_pad];
        crate::pack::pack_transposed_block(p.expert(e), p.shape, c0, np, &mut v);
        v
    }

    /// Blocks of any width come out as `pack_transposed_block` writes them; a block with a
    /// panel another thread is filling is refused and leaves nothing claimed.
    #[test]
    fn blocks_of_any_width_and_a_busy_panel() {
        let p = pack(2, 40, 200); // k_pad 224: 14 panels
        let c = MatrixCache::new(&p, CacheBudget::with_limit(usize::MAX));
        let isa = Isa::best();
        assert_eq!(c.block(isa, &p, 1, 32, 3).unwrap(), &want(&p, 1, 32, 3)[..]);
        assert_eq!(c.bytes(), p.shape.len() * 2);
        // Overlapping a filled block, another width.
        assert_eq!(c.block(isa, &p, 1, 0, 8).unwrap(), &want(&p, 1, 0, 8)[..]);
        let entry = c.entry(1).unwrap();
        entry.state[10].store(FILLING, Ordering::Relaxed);
        assert!(c.block(isa, &p, 1, 8 * PANEL, 4).is_none());
        assert!(entry.state[8..10]
            .iter()
            .all(|s| s.load(Ordering::Relaxed) == EMPTY));
        entry.state[10].store(EMPTY, Ordering::Relaxed);
        assert_eq!(
            c.block(isa, &p, 1, 8 * PANEL, 6).unwrap(),
            &want(&p, 1, 128, 6)[..]
        );
        assert_eq!(c.bytes(), p.shape.len() * 2);
        // Budget 0 (knob off): nothing, even for an expert already cached.
        let off = MatrixCache::new(&p, CacheBudget::with_limit(0));
        assert!(off.block(isa, &p, 0, 0, 2).is_none() && off.bytes() == 0);
    }

    /// Threads asking for overlapping blocks of different widths at once get either the
    /// right bytes or `None`, never a half-filled block; one entry per expert is kept.
    #[test]
    fn concurrent_fills() {
        let p = pack(3, 64, 512); // 32 panels
        let budget = CacheBudget::with_limit(usize::MAX);
        for round in 0..20 {
            let c = MatrixCache::new(&p, budget.clone());
            std::thread::scope(|s| {
                for t in 0..4usize {
                    let (c, p) = (&c, &p);
                    s.spawn(move || {
                        for i in 0..40usize {
                            let np = [1, 2, 4, 8, 16][(i + t + round) % 5];
                            let c0 = ((i * 7 + t * 3) % (32 - np + 1)) * PANEL;
                            let e = (i + t) % 3;
                            if let Some(b) = c.block(Isa::best(), p, e, c0, np) {
                                assert_eq!(b, &want(p, e, c0, np)[..]);
                            }
                        }
                    });
                }
            });
            assert_eq!(c.bytes(), 3 * p.shape.len() * 2);
            assert_eq!(budget.used(), c.bytes());
        }
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn meminfo_fields_parse() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   1234 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24000000 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(1234 * 1024));
        assert_eq!(meminfo_field(text, "Mem"), None);
        assert_eq!(meminfo_field("MemTotal: x kB", "MemTotal"), None);
        #[cfg(target_os = "linux")]
        {
            assert!(physical_memory_bytes() > 0);
            assert!(os_can_spare(1 << 20) && !os_can_spare(usize::MAX / 2));
        }
    }
}
