//! DLPack in both directions, so no tensor crosses the boundary as a bare integer.
//!
//! Import ([`TensorArg`]): any object with `__dlpack__` (torch tensors). Rust checks
//! device, dtype, shape and contiguity itself and borrows the memory only for the call:
//! the capsule stays alive (and with it the producer's tensor) until the `TensorArg` is
//! dropped, after which the capsule's own destructor releases it.
//!
//! Export ([`export_f32`]): a Rust-owned buffer becomes a legacy `dltensor` capsule that
//! `torch.from_dlpack` turns into a zero-copy tensor. The capsule's manager context
//! holds an `Arc` of the buffer, so the memory lives as long as any tensor viewing it,
//! whatever happens to the layer that made it.

use ktrs::buffer::Buffer;

use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use std::ffi::{c_void, CStr};
use std::sync::Arc;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i32 = 1;
/// Pinned (page-locked) host memory: readable by the CPU like any host memory.
const DL_CUDA_HOST: i32 = 3;
const DLTENSOR: &CStr = c"dltensor";

/// Element types the kernels accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F32,
    I64,
    /// float8 checkpoint weights, under DLPack 1.1's codes (as torch exports them).
    F8E4M3Fn,
    F8E5M2,
}

impl DType {
    fn dl(self) -> DLDataType {
        let (code, bits) = match self {
            DType::BF16 => (4, 16),
            DType::F32 => (2, 32),
            DType::I64 => (0, 64),
            DType::F8E4M3Fn => (10, 8),
            DType::F8E5M2 => (12, 8),
        };
        DLDataType {
            code,
            bits,
            lanes: 1,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            DType::BF16 => "torch.bfloat16",
            DType::F32 => "torch.float32",
            DType::I64 => "torch.int64",
            DType::F8E4M3Fn => "torch.float8_e4m3fn",
            DType::F8E5M2 => "torch.float8_e5m2",
        }
    }
}

fn dtype_name(d: DLDataType) -> String {
    match (d.code, d.bits) {
        (0, b) => format!("int{b}"),
        (1, b) => format!("uint{b}"),
        (2, 16) => "torch.float16".into(),
        (2, b) => format!("float{b}"),
        (4, 16) => "torch.bfloat16".into(),
        (6, _) => "bool".into(),
        (10, 8) => "torch.float8_e4m3fn".into(),
        (12, 8) => "torch.float8_e5m2".into(),
        (c, b) => format!("dtype(code={c}, bits={b})"),
    }
}

/// A borrowed, validated CPU tensor.
pub struct TensorArg<'py> {
    _capsule: Bound<'py, PyAny>,
    data: *mut u8,
    numel: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl<'py> TensorArg<'py> {
    /// Validates `obj` as a contiguous CPU tensor of `dtype` whose shape matches `shape`
    /// (`None` entries are free). `name` is the argument name used in errors.
    pub fn new(
        name: &str,
        obj: &Bound<'py, PyAny>,
        dtype: DType,
        shape: &[Option<usize>],
    ) -> PyResult<TensorArg<'py>> {
        Self::new_of(name, obj, &[dtype], shape)
    }

    /// [`Self::new`] accepting any of `dtypes` (the one found is `self.dtype`).
    pub fn new_of(
        name: &str,
        obj: &Bound<'py, PyAny>,
        dtypes: &[DType],
        shape: &[Option<usize>],
    ) -> PyResult<TensorArg<'py>> {
        if !obj.hasattr("__dlpack__")? {
            let want = "a torch.Tensor (or any DLPack tensor)";
            return Err(crate::error::wrong_type(name, want, obj));
        }
        // torch's `__dlpack_device__` asks CUDA whether a CPU tensor is pinned, which
        // fails in a process forked after CUDA was initialised (a DataLoader worker):
        // a tensor that says it is on the CPU is taken at its word.
        let on_cpu = obj
            .getattr("device")
            .and_then(|d| d.getattr("type"))
            .and_then(|t| t.extract::<String>())
            .is_ok_and(|t| t == "cpu");
        let (dev_type, dev_id): (i32, i32) = if on_cpu {
            (DL_CPU, 0)
        } else {
            obj.call_method0("__dlpack_device__")
                .and_then(|d| d.extract())
                .map_err(|e| {
                    crate::error::type_err(format!(
                        "`{name}` must be a torch.Tensor (or any DLPack tensor): __dlpack_device__() failed: {e}"
                    ))
                })?
        };
        if dev_type != DL_CPU && dev_type != DL_CUDA_HOST {
            let dev = if dev_type == 2 {
                format!("cuda:{dev_id}")
            } else {
                format!("device type {dev_type}")
            };
            return Err(crate::error::value_err(format!(
                "`{name}` must be a CPU tensor, got a tensor on {dev}"
            )));
        }
        if obj
            .getattr("requires_grad")
            .and_then(|v| v.extract::<bool>())
            .unwrap_or(false)
        {
            return Err(crate::error::value_err(format!(
                "`{name}` must not require grad here; pass `{name}.detach()`"
            )));
        }
        let capsule = obj.call_method0("__dlpack__").map_err(|e| {
            crate::error::value_err(format!(
                "`{name}` cannot be passed to ktrs (its __dlpack__() failed: {e}); pass a plain contiguous tensor"
            ))
        })?;
        let cap = capsule.cast::<PyCapsule>().map_err(|_| {
            crate::error::type_err(format!("`{name}`.__dlpack__() did not return a capsule"))
        })?;
        // SAFETY: a "dltensor" capsule holds a DLManagedTensor that lives as long as the
        // capsule, which we keep in `_capsule`.
        let managed = unsafe { pyo3::ffi::PyCapsule_GetPointer(cap.as_ptr(), DLTENSOR.as_ptr()) }
            as *const DLManagedTensor;
        if managed.is_null() {
            return Err(crate::error::type_err(format!(
                "`{name}`.__dlpack__() returned an unnamed or used capsule"
            )));
        }
        let t = unsafe { &(*managed).dl_tensor };
        let Some(&dtype) = dtypes.iter().find(|d| d.dl() == t.dtype) else {
            let names: Vec<&str> = dtypes.iter().map(|d| d.torch_name()).collect();
            return Err(crate::error::type_err(format!(
                "`{name}` must have dtype {}, got {}",
                names.join(" or "),
                dtype_name(t.dtype)
            )));
        };
        let ndim = t.ndim.max(0) as usize;
        // SAFETY: shape has ndim entries; strides is null or has ndim entries (DLPack).
        let dims: Vec<i64> = (0..ndim).map(|i| unsafe { *t.shape.add(i) }).collect();
        let got: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
        let shape_ok = got.len() == shape.len()
            && got
                .iter()
                .zip(shape)
                .all(|(g, w)| w.is_none_or(|w| *g == w));
        if !shape_ok {
            let want: Vec<String> = shape
                .iter()
                .map(|d| d.map_or("*".to_string(), |v| v.to_string()))
                .collect();
            return Err(crate::error::value_err(format!(
                "`{name}` must have shape [{}], got {:?}",
                want.join(", "),
                got
            )));
        }
        let numel = got
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                crate::error::value_err(format!(
                    "`{name}` has a shape whose size overflows: {got:?}"
                ))
            })?;
        if !t.strides.is_null() && numel > 1 {
            let mut expect = 1i64;
            for i in (0..ndim).rev() {
                let st = unsafe { *t.strides.add(i) };
                if dims[i] != 1 && st != expect {
                    return Err(crate::error::value_err(format!(
                        "`{name}` must be contiguous; call `{name}.contiguous()` first"
                    )));
                }
                expect = expect.saturating_mul(dims[i].max(1));
            }
        }
        let data = unsafe { (t.data as *mut u8).add(t.byte_offset as usize) };
        let align = usize::from(dtype.dl().bits / 8);
        if numel > 0 && !(data as usize).is_multiple_of(align) {
            return Err(crate::error::value_err(format!(
                "`{name}` data is not aligned to its element size"
            )));
        }
        Ok(TensorArg {
            _capsule: capsule,
            data,
            numel,
            shape: got,
            dtype,
        })
    }

    pub fn u16s(&self) -> &[u16] {
        self.slice()
    }
    pub fn f32s(&self) -> &[f32] {
        self.slice()
    }
    pub fn i64s(&self) -> &[i64] {
        self.slice()
    }
    pub fn bytes(&self) -> &[u8] {
        self.slice()
    }

    fn slice<T>(&self) -> &[T] {
        if self.numel == 0 {
            return &[];
        }
        // SAFETY: dtype and size were validated in `new`; the capsule keeps it alive.
        unsafe { std::slice::from_raw_parts(self.data as *const T, self.numel) }
    }

    /// Mutable view for output arguments.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut<T>(&self) -> &mut [T] {
        if self.numel == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`; output tensors are written only by the call that owns them.
        unsafe { std::slice::from_raw_parts_mut(self.data as *mut T, self.numel) }
    }

    /// Raw address, for checking that two arguments do not overlap.
    pub fn addr_range(&self, elem: usize) -> (usize, usize) {
        (self.data as usize, self.data as usize + self.numel * elem)
    }
}

/// Manager context of an exported tensor.
struct Export {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    _owner: Arc<dyn Send + Sync>,
}

unsafe extern "C" fn delete_export(m: *mut DLManagedTensor) {
    if !m.is_null() {
        // SAFETY: manager_ctx is the Box<Export> leaked in `export_raw`.
        drop(Box::from_raw((*m).manager_ctx as *mut Export));
    }
}

unsafe extern "C" fn capsule_destructor(cap: *mut pyo3::ffi::PyObject) {
    // Only an unconsumed capsule still owns its tensor (a consumer renames it).
    let p = pyo3::ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
    if p.is_null() {
        pyo3::ffi::PyErr_Clear();
        return;
    }
    if let Some(d) = (*p).deleter {
        d(p);
    }
}

/// A `dltensor` capsule viewing `buf` with `shape` (f32, contiguous, CPU).
pub fn export_f32<'py>(
    py: Python<'py>,
    buf: &Arc<Buffer<f32>>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    assert_eq!(shape.iter().product::<usize>(), buf.len());
    // SAFETY: the buffer holds exactly `shape` f32 values and `owner` keeps it alive.
    unsafe { export_raw(py, buf.clone(), buf.as_ptr() as *mut u8, DType::F32, shape) }
}

/// A `dltensor` capsule viewing `shape` elements of `dtype` at `data` (contiguous, CPU).
///
/// # Safety
/// `data` must hold that many elements, suitably aligned, for as long as `owner` lives.
pub unsafe fn export_raw<'py>(
    py: Python<'py>,
    owner: Arc<dyn Send + Sync>,
    data: *mut u8,
    dtype: DType,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let mut ex = Box::new(Export {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data: data as *mut c_void,
                device: DLDevice {
                    device_type: DL_CPU,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype: dtype.dl(),
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_export),
        },
        shape: shape.iter().map(|&d| d as i64).collect(),
        _owner: owner,
    });
    ex.managed.dl_tensor.shape = ex.shape.as_mut_ptr();
    let raw = Box::into_raw(ex);
    // SAFETY: raw is a valid Box<Export>; the managed tensor is its first field.
    {
        (*raw).managed.manager_ctx = raw as *mut c_void;
        let m = &mut (*raw).managed as *mut DLManagedTensor;
        let cap = pyo3::ffi::PyCapsule_New(
            m as *mut c_void,
            DLTENSOR.as_ptr(),
            Some(capsule_destructor),
        );
        if cap.is_null() {
            delete_export(m);
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap))
    }
}
