//! `dequantize_fp8`: block-wise fp8 → bf16 for loading quantised checkpoints
//! (`ktrs.hf`), on the shared worker pool with the GIL released.

use crate::dlpack::{DType, TensorArg};
use crate::error::{guard, value_err, IntoPy};
use crate::experts::{int_arg, opt_int_arg};
use ktrs::fp8::{self, Fp8Format};
use pyo3::prelude::*;

/// Writes `weight` ([n, k] float8_e4m3fn or float8_e5m2) times its block scales `scale`
/// ([⌈n/bn⌉, ⌈k/bk⌉] float32, `block` = (bn, bk)) into `out` ([n, k] bfloat16), each
/// element rounded as `(weight.float() * scale).to(torch.bfloat16)` rounds it.
#[pyfunction]
#[pyo3(signature = (weight, scale, out, block, *, threads=None))]
pub fn dequantize_fp8(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    scale: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    block: &Bound<'_, PyAny>,
    threads: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    guard(|| {
        let w = TensorArg::new_of(
            "weight",
            weight,
            &[DType::F8E4M3Fn, DType::F8E5M2],
            &[None, None],
        )?;
        let (n, k) = (w.shape[0], w.shape[1]);
        // Taken as an object so that a wrong one gets an error naming `block`, not
        // pyo3's bare OverflowError or tuple-length message.
        let sizes: Vec<Bound<'_, PyAny>> = block.extract().unwrap_or_default();
        if sizes.len() != 2 {
            return Err(value_err(format!(
                "`block` must be two positive integers (rows, columns), got {}",
                block.repr()?
            )));
        }
        let bn = int_arg("block", &sizes[0], 1, usize::MAX)?;
        let bk = int_arg("block", &sizes[1], 1, usize::MAX)?;
        let threads = opt_int_arg("threads", threads, 1, ktrs::pool::MAX_THREADS)?;
        let grid = [n.div_ceil(bn), k.div_ceil(bk)];
        let s = TensorArg::new("scale", scale, DType::F32, &[None, None])?;
        if s.shape != grid {
            return Err(value_err(format!(
                "`scale` must have shape {grid:?} (one per block of weight [{n}, {k}] in blocks of [{bn}, {bk}]), got {:?}",
                s.shape
            )));
        }
        let o = TensorArg::new("out", out, DType::BF16, &[Some(n), Some(k)])?;
        let format = match w.dtype {
            DType::F8E5M2 => Fp8Format::E5M2,
            _ => Fp8Format::E4M3Fn,
        };
        let pool =
            ktrs::ThreadPool::shared(ktrs::pool::resolve_threads(threads).py_err()?).py_err()?;
        let (wb, sf, ob) = (w.bytes(), s.f32s(), o.slice_mut::<u16>());
        py.detach(|| fp8::dequantize_bf16(format, wb, [n, k], sf, [bn, bk], ob, Some(&pool)))
            .py_err()
    })
}
