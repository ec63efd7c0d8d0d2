//! 64-byte aligned, zero-initialised heap buffers: the only allocation type the kernels read.
//!
//! A [`Buffer`] has interior mutability on purpose: LoRA weights are shared with Python as
//! zero-copy tensors, and the optimizer writes them between kernel calls. Access goes
//! through `as_slice`/`as_mut_slice`, whose callers promise (SAFETY notes at call sites)
//! that no other thread writes while they read. Dropping happens when the last `Arc`
//! goes, so a tensor view exported to Python keeps its memory alive on its own.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ptr::NonNull;

pub const ALIGN: usize = 64;

pub struct Buffer<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    _marker: PhantomData<UnsafeCell<T>>,
}

// SAFETY: a Buffer is plain memory; synchronisation is the caller's contract (see module doc).
unsafe impl<T: Copy + Send> Send for Buffer<T> {}
unsafe impl<T: Copy + Sync> Sync for Buffer<T> {}

impl<T: Copy> Buffer<T> {
    /// A zero-filled buffer of `len` elements (all-zero bits are valid for u16/f32/u32/i64).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Buffer { ptr: NonNull::dangling(), len: 0, _marker: PhantomData };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) } as *mut T;
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buffer { ptr, len, _marker: PhantomData }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len * std::mem::size_of::<T>(), ALIGN).expect("buffer too large")
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
        if self.len != 0 {
            // SAFETY: allocated in `zeroed` with the same layout.
            unsafe { dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) }
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
    fn aligned_and_zeroed() {
        let b: Buffer<f32> = Buffer::zeroed(1000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0.0));
        let e: Buffer<u16> = Buffer::zeroed(0);
        assert!(e.as_slice().is_empty());
    }
}
