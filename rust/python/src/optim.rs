//! `AdamWState` (one tensor's AdamW moments and step, Rust memory) and `adamw_step`
//! (one fused, multi-threaded AdamW step over many tensors), for `ktrs.optim.AdamW`.
//!
//! Memory: the state buffers are Rust's and reach Python only as zero-copy views (the
//! capsule holds an `Arc`, so a view outlives the state safely). Parameters and
//! gradients are the caller's: they are borrowed through DLPack for the one call (the
//! capsules keep their storage alive until it returns), so the step always writes the
//! storage a parameter has *now*, never a stale pointer kept from an earlier call; a
//! parameter whose shape no longer matches its state is refused.

use crate::dlpack::{export_f32, DType, TensorArg};
use crate::error::IntoPy;
use ktrs::optim::{self, AdamWHyper, AdamWUpdate, Overlap};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[pyclass(module = "ktrs._native", name = "AdamWState", frozen)]
pub struct AdamWState {
    inner: optim::AdamWState,
    shape: Vec<usize>,
}

#[pymethods]
impl AdamWState {
    /// Zero moments and step 0 for a parameter of `shape`.
    #[new]
    fn new(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        AdamWState {
            inner: optim::AdamWState::new(n),
            shape,
        }
    }

    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// Steps taken so far.
    #[getter]
    fn step(&self) -> f32 {
        self.inner.step()
    }

    /// Zero-copy f32 view of the first moment, shaped like the parameter.
    fn exp_avg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        export_f32(py, self.inner.exp_avg(), &self.shape)
    }

    /// Zero-copy f32 view of the second moment.
    fn exp_avg_sq<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        export_f32(py, self.inner.exp_avg_sq(), &self.shape)
    }

    /// Zero-copy 0-dim f32 view of the step count (torch keeps `state["step"]` so).
    fn step_tensor<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        export_f32(py, self.inner.step_buffer(), &[])
    }

    /// Replaces moments and step (restoring a checkpoint); f32 CPU tensors of `shape`.
    fn load(
        &self,
        exp_avg: &Bound<'_, PyAny>,
        exp_avg_sq: &Bound<'_, PyAny>,
        step: f64,
    ) -> PyResult<()> {
        let want: Vec<Option<usize>> = self.shape.iter().map(|&d| Some(d)).collect();
        let m = TensorArg::new("exp_avg", exp_avg, DType::F32, &want)?;
        let v = TensorArg::new("exp_avg_sq", exp_avg_sq, DType::F32, &want)?;
        self.inner.load(m.f32s(), v.f32s(), step).py_err()
    }
}

/// One AdamW step: `params[i]` (f32 CPU, contiguous, updated in place) with `grads[i]`
/// (same shape) and `states[i]`, hyperparameters `hypers[i] = (lr, beta1, beta2, eps,
/// weight_decay)`. All tensors in one parallel region of the shared worker pool of
/// `threads` threads; the GIL is released meanwhile.
#[pyfunction]
#[pyo3(signature = (states, params, grads, hypers, *, threads=None))]
fn adamw_step(
    py: Python<'_>,
    states: Vec<Bound<'_, AdamWState>>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    hypers: Vec<(f64, f64, f64, f64, f64)>,
    threads: Option<usize>,
) -> PyResult<()> {
    let n = states.len();
    if params.len() != n || grads.len() != n || hypers.len() != n {
        return Err(PyValueError::new_err(format!(
            "`states`, `params`, `grads` and `hypers` must have one entry per tensor, got {n}, {}, {} and {}",
            params.len(),
            grads.len(),
            hypers.len()
        )));
    }
    if threads == Some(0) {
        return Err(PyValueError::new_err("`threads` must be at least 1"));
    }
    let mut ps = Vec::with_capacity(n);
    let mut gs = Vec::with_capacity(n);
    for i in 0..n {
        let want: Vec<Option<usize>> = states[i].get().shape.iter().map(|&d| Some(d)).collect();
        ps.push(TensorArg::new(
            &format!("params[{i}]"),
            &params[i],
            DType::F32,
            &want,
        )?);
        gs.push(TensorArg::new(
            &format!("grads[{i}]"),
            &grads[i],
            DType::F32,
            &want,
        )?);
    }
    let mut seen = std::collections::HashSet::new();
    for (i, s) in states.iter().enumerate() {
        if !seen.insert(s.get() as *const AdamWState as usize) {
            return Err(PyValueError::new_err(format!(
                "`states[{i}]` is given twice; each state at most once per step"
            )));
        }
    }
    // Everything written (weights, both moments) must be disjoint, and no gradient may
    // alias it: the chunks run on several threads at once.
    let mut written: Vec<(usize, usize)> = ps.iter().map(|p| p.addr_range(4)).collect();
    for s in &states {
        for b in [s.get().inner.exp_avg(), s.get().inner.exp_avg_sq()] {
            let a = b.as_ptr() as usize;
            written.push((a, a + 4 * b.len()));
        }
    }
    let read: Vec<(usize, usize)> = gs.iter().map(|g| g.addr_range(4)).collect();
    let name = |w: usize| {
        if w < n {
            format!("`params[{w}]`")
        } else {
            let k = w - n;
            let which = if k.is_multiple_of(2) {
                "exp_avg"
            } else {
                "exp_avg_sq"
            };
            format!("the {which} of states[{}]", k / 2)
        }
    };
    match optim::find_overlap(&written, &read) {
        Some(Overlap::Written(a, b)) if b >= n => {
            return Err(PyValueError::new_err(format!(
                "{} must not share memory with {} (ktrs' optimizer state)",
                name(a),
                name(b)
            )))
        }
        Some(Overlap::Written(a, b)) => {
            return Err(PyValueError::new_err(format!(
                "{} must not share memory with {} (a parameter given twice?)",
                name(b),
                name(a)
            )))
        }
        Some(Overlap::Read { read, written }) => {
            return Err(PyValueError::new_err(format!(
                "`grads[{read}]` must not share memory with {}",
                name(written)
            )))
        }
        None => {}
    }
    let mut updates: Vec<AdamWUpdate<'_>> = (0..n)
        .map(|i| {
            let (lr, beta1, beta2, eps, weight_decay) = hypers[i];
            AdamWUpdate {
                // The ranges were checked disjoint above, so these `&mut` do not alias.
                param: ps[i].slice_mut::<f32>(),
                grad: gs[i].f32s(),
                state: &states[i].get().inner,
                hyper: AdamWHyper {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                },
            }
        })
        .collect();
    let pool = ktrs::ThreadPool::shared(ktrs::pool::resolve_threads(threads).py_err()?).py_err()?;
    py.detach(|| optim::adamw_step(&pool, &mut updates))
        .py_err()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<AdamWState>()?;
    m.add_function(wrap_pyfunction!(adamw_step, m)?)
}
