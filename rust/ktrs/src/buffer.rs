//! 64-byte aligned, zero-initialised heap buffers: the only allocation type the kernels read.
//!
//! A [`Buffer`] has interior mutability on purpose: LoRA weights are shared with Python as
//! zero-copy tensors, and the optimizer writes them between kernel calls. Access goes
//! through `as_slice`/`as_mut_slice`, whose callers promise (SAFETY notes at call sites)
//! that no other thread writes while they read. Dropping happens when the last `Arc`
//! goes, so a tensor view exported to Python keeps its memory alive on its own.

use std::alloc::{alloc_zeroed as heap_alloc_zeroed, dealloc as heap_dealloc, Layout};
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::error::{checked_size, KtrsError, Result};

pub const ALIGN: usize = 64;

pub struct Buffer<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes allocated (may exceed `len` elements for a recycled block).
    cap: usize,
    /// Where the block goes when dropped; `None` frees it.
    pool: Option<Arc<BufferPool>>,
    _marker: PhantomData<UnsafeCell<T>>,
}

// SAFETY: a Buffer is plain memory; synchronisation is the caller's contract (see module doc).
unsafe impl<T: Copy + Send> Send for Buffer<T> {}
unsafe impl<T: Copy + Sync> Sync for Buffer<T> {}

fn layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes, ALIGN).unwrap_or_else(|_| alloc_failed(bytes))
}

/// The panic payload of a failed allocation on a path that cannot return an error (the
/// scratch of a forward, a weight pack). [`catch_alloc`] and the Python binding turn it
/// into [`KtrsError::OutOfMemory`]; the global allocator's `handle_alloc_error` would
/// abort the process instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocFailure {
    pub bytes: usize,
}

/// Unwinds with an [`AllocFailure`] payload.
pub fn alloc_failed(bytes: usize) -> ! {
    std::panic::panic_any(AllocFailure { bytes })
}

/// Runs `f`, turning an [`AllocFailure`] raised inside into `OutOfMemory` naming `what`;
/// any other panic continues unwinding.
pub fn catch_alloc<R>(what: &str, f: impl FnOnce() -> R) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| match payload
        .downcast_ref::<AllocFailure>(
    ) {
        Some(a) => KtrsError::OutOfMemory {
            what: what.to_string(),
            bytes: a.bytes as u128,
        },
        None => std::panic::resume_unwind(payload),
    })
}

/// Bytes of `len` elements of `T`, or `OutOfMemory` naming `what` if that overflows.
fn bytes_of<T>(what: &str, len: usize) -> Result<usize> {
    checked_size(what, &[len, std::mem::size_of::<T>()])
}

/// Blocks at least this large come straight from the OS (mmap): zero pages are free and
/// lazy, while the heap's aligned calloc writes every byte (1.2 s per DeepSeek-V2-Lite
/// layer of expert weights), and transparent huge pages cut TLB misses when the kernels
/// stream the weights.
const MMAP_MIN: usize = 1 << 20;

/// `KTRS_THP=0` turns the huge-page advice off.
fn use_huge_pages() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("KTRS_THP").map(|v| v != "0").unwrap_or(true))
}

/// # Safety
/// `bytes > 0`.
unsafe fn alloc_zeroed(l: Layout) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if l.size() >= MMAP_MIN {
        let p = libc::mmap(
            std::ptr::null_mut(),
            l.size(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        // Advice only: failure (THP disabled) changes nothing else.
        if use_huge_pages() {
            libc::madvise(p, l.size(), libc::MADV_HUGEPAGE);
        }
        return p as *mut u8;
    }
    heap_alloc_zeroed(l)
}

/// # Safety
/// `p` came from `alloc_zeroed` with the same layout.
unsafe fn dealloc(p: *mut u8, l: Layout) {
    #[cfg(target_os = "linux")]
    if l.size() >= MMAP_MIN {
        libc::munmap(p as *mut libc::c_void, l.size());
        return;
    }
    heap_dealloc(p, l)
}

impl<T: Copy> Buffer<T> {
    /// A zero-filled buffer of `len` elements (all-zero bits are valid for u16/f32/u32/i64);
    /// unwinds with [`AllocFailure`] when the memory cannot be had.
    pub fn zeroed(len: usize) -> Self {
        Self::try_zeroed("a buffer", len).unwrap_or_else(|e| match e {
            KtrsError::OutOfMemory { bytes, .. } => {
                alloc_failed(usize::try_from(bytes).unwrap_or(usize::MAX))
            }
            _ => alloc_failed(usize::MAX),
        })
    }

    /// A zero-filled buffer of `len` elements, or `OutOfMemory` naming `what`.
    pub fn try_zeroed(what: &str, len: usize) -> Result<Self> {
        let bytes = bytes_of::<T>(what, len)?;
        if bytes == 0 {
            return Ok(Buffer {
                ptr: NonNull::dangling(),
                len,
                cap: 0,
                pool: None,
                _marker: PhantomData,
            });
        }
        let oom = || KtrsError::OutOfMemory {
            what: what.to_string(),
            bytes: bytes as u128,
        };
        let l = Layout::from_size_align(bytes, ALIGN).map_err(|_| oom())?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(l) } as *mut T;
        let ptr = NonNull::new(raw).ok_or_else(oom)?;
        Ok(Buffer {
            ptr,
            len,
            cap: bytes,
            pool: None,
            _marker: PhantomData,
        })
    }
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: ptr is valid for len elements for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Mutable access through a shared reference.
    ///
    /// # Safety
    /// No other slice of this buffer may be alive while the returned one is written.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice_unchecked(&self) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: &mut self guarantees exclusivity.
        unsafe { self.as_mut_slice_unchecked() }
    }

    pub fn from_slice(src: &[T]) -> Self {
        let mut b = Self::zeroed(src.len());
        b.as_mut_slice().copy_from_slice(src);
        b
    }
}

impl<T: Copy> Drop for Buffer<T> {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        let raw = self.ptr.as_ptr() as *mut u8;
        match self.pool.take() {
            Some(pool) => pool.give(raw, self.cap),
            // SAFETY: allocated with `layout(self.cap)`.
            None => unsafe { dealloc(raw, layout(self.cap)) },
        }
    }
}

/// Recycles large blocks between calls of one layer.
///
/// Fresh memory costs a page fault per 4 KiB on first touch (several microseconds in a
/// VM); a T=2048 forward at DeepSeek-V2-Lite shape touches ~250 MB of scratch and cache,
/// so allocating per call cost more than the GEMMs. Blocks come back here when their
/// `Buffer` drops (a forward cache included). Recycled blocks are *not* zeroed: users
/// write every element they later read, padding included.
pub struct BufferPool {
    free: Mutex<Vec<RawBlock>>,
    /// Blocks allocated fresh (not recycled), for tests of the steady state.
    fresh: std::sync::atomic::AtomicUsize,
}

struct RawBlock(*mut u8, usize);
// SAFETY: an owned heap block with no other references.
unsafe impl Send for RawBlock {}

/// Free blocks kept per pool; more are released to the allocator.
const MAX_FREE: usize = 16;

impl BufferPool {
    pub fn new() -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            fresh: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The process-wide pool every layer draws from: layers run one after another, so
    /// sharing keeps the retained scratch near one layer's peak instead of one per layer
    /// (26 layers × ~250 MB at T=2048 for DeepSeek-V2-Lite otherwise).
    pub fn global() -> Arc<BufferPool> {
        static POOL: std::sync::OnceLock<Arc<BufferPool>> = std::sync::OnceLock::new();
        POOL.get_or_init(BufferPool::new).clone()
    }

    /// A buffer of `len` elements with unspecified (but initialised) contents; unwinds with
    /// [`AllocFailure`] when the memory cannot be had (the callers are deep inside a
    /// forward or backward; the binding turns it into a `MemoryError`).
    pub fn take<T: Copy>(self: &Arc<Self>, len: usize) -> Buffer<T> {
        let need = len
            .checked_mul(std::mem::size_of::<T>())
            .unwrap_or_else(|| alloc_failed(usize::MAX));
        if need == 0 {
            return Buffer::zeroed(len);
        }
        let block = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.1 >= need)
                .min_by_key(|(_, b)| b.1)
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let (raw, cap) = match block {
            Some(RawBlock(p, c)) => (p, c),
            None => {
                self.fresh
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Zeroed once, so contents are always initialised plain data.
                // SAFETY: non-zero size.
                let p = unsafe { alloc_zeroed(layout(need)) };
                if p.is_null() {
                    alloc_failed(need);
                }
                (p, need)
            }
        };
        // Tests poison every block (NaN in bf16 and f32) so any read-before-write shows.
        #[cfg(test)]
        // SAFETY: the block has `cap >= need` bytes and is exclusively ours.
        unsafe {
            std::ptr::write_bytes(raw, 0xff, need)
        };
        Buffer {
            ptr: NonNull::new(raw as *mut T).expect("non-null"),
            len,
            cap,
            pool: Some(self.clone()),
            _marker: PhantomData,
        }
    }

    fn give(&self, raw: *mut u8, cap: usize) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(RawBlock(raw, cap));
        if free.len() > MAX_FREE {
            // Drop the smallest: big blocks are the expensive ones to fault in again.
            let i = free
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.1)
                .map(|(i, _)| i)
                .expect("non-empty");
            let RawBlock(p, c) = free.swap_remove(i);
            // SAFETY: allocated with `layout(c)`.
            unsafe { dealloc(p, layout(c)) };
        }
    }

    /// How many blocks this pool has allocated fresh so far.
    pub fn fresh_allocations(&self) -> usize {
        self.fresh.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes held in free blocks.
    pub fn free_bytes(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|b| b.1)
            .sum()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        for RawBlock(p, c) in self
            .free
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: allocated with `layout(c)`.
            unsafe { dealloc(p, layout(c)) };
        }
    }
}

/// A raw pointer that may be shared with worker threads. Each task writes a disjoint part;
/// the code that creates one states why the parts are disjoint.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: see the type's doc: disjointness is argued where it is used.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `off` must be in bounds and not accessed by anyone else meanwhile.
    #[inline]
    pub unsafe fn write(self, off: usize, v: T) {
        self.0.add(off).write(v)
    }

    /// # Safety
    /// `off..off+len` must be in bounds and not accessed by anyone else meanwhile.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a>(self, off: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_recycles_blocks() {
        let pool = BufferPool::new();
        let a: Buffer<f32> = pool.take(1000);
        let p = a.as_ptr() as usize;
        assert_eq!(p % ALIGN, 0);
        drop(a);
        assert_eq!(pool.free_bytes(), 4000);
        let b: Buffer<u16> = pool.take(1500); // fits the 4000-byte block
        assert_eq!(b.as_ptr() as usize, p);
        assert_eq!(pool.free_bytes(), 0);
        drop(pool); // the buffer keeps the pool alive
        drop(b);
    }

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let e = Buffer::<f32>::try_zeroed("test", usize::MAX / 2)
            .err()
            .unwrap();
        assert!(matches!(e, KtrsError::OutOfMemory { .. }), "{e}");
        // Fits the address space but not any machine: the OS refuses, no abort.
        let e = Buffer::<u16>::try_zeroed("huge", 1 << 62).err().unwrap();
        assert!(e.to_string().contains("huge"), "{e}");
        let r = catch_alloc("scratch", || BufferPool::new().take::<f32>(1 << 61));
        assert!(matches!(r, Err(KtrsError::OutOfMemory { .. })));
        let r = catch_alloc("pack", || Buffer::<u16>::zeroed(1 << 62));
        assert!(matches!(r, Err(KtrsError::OutOfMemory { .. })));
    }

    #[test]
    fn aligned_and_zeroed() {
        let b: Buffer<f32> = Buffer::zeroed(1000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0.0));
        let e: Buffer<u16> = Buffer::zeroed(0);
        assert!(e.as_slice().is_empty());
    }
}
