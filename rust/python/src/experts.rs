//! `Experts`: one layer's routed experts (a `ktrs::MoeLayer`), and `ForwardHandle`, the
//! saved state of one forward.

use crate::dlpack::{export_f32, DType, TensorArg};
use crate::error::IntoPy;
use ktrs::{
    ExpertWeights, ForwardCache, GradTarget, Isa, LoraConfig, LoraMatrix, MoeConfig, MoeLayer,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[pyclass(module = "ktrs._native", name = "Experts")]
pub struct Experts {
    /// Shared with the host functions of decode graphs (`HostStage`), which run the
    /// forward on a CUDA driver thread without the GIL; the lock keeps them and the
    /// mutating methods apart.
    layer: Arc<RwLock<MoeLayer>>,
}

/// What one forward saved for its backward. Dropping it frees the memory.
#[pyclass(module = "ktrs._native", name = "ForwardHandle", frozen, weakref)]
pub struct ForwardHandle {
    cache: ForwardCache,
}

fn parse_isa(py: Python<'_>, isa: Option<&str>) -> PyResult<Isa> {
    match isa {
        None | Some("auto") => Isa::from_env_or_best().py_err(py),
        Some(name) => {
            let isa: Isa = name.parse().py_err(py)?;
            isa.check_available().py_err(py)?;
            Ok(isa)
        }
    }
}

fn lora_config(rank: usize, alpha: Option<f32>, use_rslora: bool) -> Option<LoraConfig> {
    (rank > 0).then(|| LoraConfig {
        rank,
        alpha: alpha.unwrap_or(rank as f32),
        use_rslora,
    })
}

fn no_overlap(a: (&str, &TensorArg<'_>, usize), b: (&str, &TensorArg<'_>, usize)) -> PyResult<()> {
    let (x0, x1) = a.1.addr_range(a.2);
    let (y0, y1) = b.1.addr_range(b.2);
    if x0 < y1 && y0 < x1 {
        return Err(PyValueError::new_err(format!(
            "`{}` must not share memory with `{}`",
            a.0, b.0
        )));
    }
    Ok(())
}

#[pymethods]
impl Experts {
    /// Packs bf16 weights `gate [E, I, H]`, `up [E, I, H]`, `down [E, H, I]` into Rust memory.
    #[new]
    #[pyo3(signature = (gate, up, down, *, lora_rank=0, lora_alpha=None, use_rslora=false, isa=None, threads=None, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
        lora_rank: usize,
        lora_alpha: Option<f32>,
        use_rslora: bool,
        isa: Option<&str>,
        threads: Option<usize>,
        seed: u64,
    ) -> PyResult<Self> {
        let g = TensorArg::new("gate", gate, DType::BF16, &[None, None, None])?;
        let (e, i, h) = (g.shape[0], g.shape[1], g.shape[2]);
        let u = TensorArg::new("up", up, DType::BF16, &[Some(e), Some(i), Some(h)])?;
        let d = TensorArg::new("down", down, DType::BF16, &[Some(e), Some(h), Some(i)])?;
        let isa = parse_isa(py, isa)?;
        let threads = threads.unwrap_or_else(ktrs::pool::default_threads);
        let cfg = MoeConfig {
            experts: e,
            hidden: h,
            intermediate: i,
        };
        let w = ExpertWeights {
            gate: g.u16s(),
            up: u.u16s(),
            down: d.u16s(),
        };
        let lora = lora_config(lora_rank, lora_alpha, use_rslora);
        let layer = py
            .detach(|| MoeLayer::new(cfg, w, lora, isa, threads, seed))
            .py_err(py)?;
        Ok(Experts::wrap(layer))
    }

    /// A layer with zero weights, to be filled expert by expert with `set_expert`
    /// (streaming loads never hold more than one expert outside Rust).
    #[staticmethod]
    #[pyo3(signature = (experts, hidden, intermediate, *, lora_rank=0, lora_alpha=None, use_rslora=false, isa=None, threads=None, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn empty(
        py: Python<'_>,
        experts: usize,
        hidden: usize,
        intermediate: usize,
        lora_rank: usize,
        lora_alpha: Option<f32>,
        use_rslora: bool,
        isa: Option<&str>,
        threads: Option<usize>,
        seed: u64,
    ) -> PyResult<Self> {
        let isa = parse_isa(py, isa)?;
        let threads = threads.unwrap_or_else(ktrs::pool::default_threads);
        let cfg = MoeConfig {
            experts,
            hidden,
            intermediate,
        };
        let layer = MoeLayer::new_empty(
            cfg,
            lora_config(lora_rank, lora_alpha, use_rslora),
            isa,
            threads,
            seed,
        )
        .py_err(py)?;
        Ok(Experts::wrap(layer))
    }

    /// Packs expert `expert`'s bf16 weights (gate, up `[I, H]`, down `[H, I]`).
    fn set_expert(
        &mut self,
        py: Python<'_>,
        expert: usize,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let [g, u, d] = self.expert_args(gate, up, down)?;
        let (gs, us, ds) = (g.u16s(), u.u16s(), d.u16s());
        let mut guard = self.layer_mut(py)?;
        let layer: &mut MoeLayer = &mut guard;
        py.detach(|| layer.set_expert(expert, gs, us, ds))
            .py_err(py)
    }

    /// Writes expert `expert`'s weights into bf16 tensors gate, up `[I, H]`, down `[H, I]`.
    fn get_expert(
        &self,
        py: Python<'_>,
        expert: usize,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let [g, u, d] = self.expert_args(gate, up, down)?;
        let (gv, uv, dv) = self.layer().get_expert(expert).py_err(py)?;
        g.slice_mut::<u16>().copy_from_slice(&gv);
        u.slice_mut::<u16>().copy_from_slice(&uv);
        d.slice_mut::<u16>().copy_from_slice(&dv);
        Ok(())
    }

    /// Forward of the routed experts into `out` (bf16 `[T, H]`); returns a handle for
    /// backward when `save_for_backward`.
    #[pyo3(signature = (hidden, topk_ids, topk_weights, out, *, save_for_backward=false))]
    fn forward(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        save_for_backward: bool,
    ) -> PyResult<Option<ForwardHandle>> {
        let h = self.layer().config.hidden;
        let x = TensorArg::new("hidden_states", hidden, DType::BF16, &[None, Some(h)])?;
        let t = x.shape[0];
        let ids = TensorArg::new("topk_ids", topk_ids, DType::I64, &[Some(t), None])?;
        let k = ids.shape[1];
        let w = TensorArg::new(
            "topk_weights",
            topk_weights,
            DType::F32,
            &[Some(t), Some(k)],
        )?;
        let o = TensorArg::new("out", out, DType::BF16, &[Some(t), Some(h)])?;
        no_overlap(("out", &o, 2), ("hidden_states", &x, 2))?;
        let (xs, is, ws, os) = (x.u16s(), ids.i64s(), w.f32s(), o.slice_mut::<u16>());
        let guard = self.layer();
        let layer: &MoeLayer = &guard;
        let cache = py
            .detach(|| layer.forward(xs, t, is, ws, k, os, save_for_backward))
            .py_err(py)?;
        Ok(cache.map(|cache| ForwardHandle { cache }))
    }

    /// Backward from `grad_output` (bf16 `[T, H]`): writes `grad_hidden` (bf16 `[T, H]`)
    /// and `grad_topk_weights` (f32 `[T, k]`). LoRA gradients go into `lora_grads` (six
    /// f32 tensors in `lora_names()` order; overwritten, or added to with `accumulate`),
    /// or, when `lora_grads` is None, are added to the layer's own gradient buffers.
    #[pyo3(signature = (handle, grad_output, grad_hidden, grad_topk_weights, *, lora_grads=None, accumulate=false))]
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        py: Python<'_>,
        handle: &ForwardHandle,
        grad_output: &Bound<'_, PyAny>,
        grad_hidden: &Bound<'_, PyAny>,
        grad_topk_weights: &Bound<'_, PyAny>,
        lora_grads: Option<&Bound<'_, PyList>>,
        accumulate: bool,
    ) -> PyResult<()> {
        let (t, k, h) = (
            handle.cache.tokens(),
            handle.cache.top_k(),
            self.layer().config.hidden,
        );
        let guard = self.layer();
        let go = TensorArg::new("grad_output", grad_output, DType::BF16, &[Some(t), Some(h)])?;
        let gh = TensorArg::new("grad_hidden", grad_hidden, DType::BF16, &[Some(t), Some(h)])?;
        let gw = TensorArg::new(
            "grad_topk_weights",
            grad_topk_weights,
            DType::F32,
            &[Some(t), Some(k)],
        )?;
        no_overlap(("grad_hidden", &gh, 2), ("grad_output", &go, 2))?;
        let mut ext = Vec::new();
        if let Some(list) = lora_grads {
            let lora = guard.lora().ok_or_else(|| {
                PyValueError::new_err("`lora_grads` given, but this layer has no LoRA")
            })?;
            if list.len() != 6 {
                return Err(PyValueError::new_err(format!(
                    "`lora_grads` must hold 6 tensors ({}), got {}",
                    names().join(", "),
                    list.len()
                )));
            }
            for (m, obj) in LoraMatrix::ALL.iter().zip(list.iter()) {
                let shape = lora.shape(*m).map(Some);
                ext.push(TensorArg::new(
                    &format!("lora_grads[{}]", m.name()),
                    &obj,
                    DType::F32,
                    &shape,
                )?);
            }
        }
        let (gos, ghs, gws) = (go.u16s(), gh.slice_mut::<u16>(), gw.slice_mut::<f32>());
        let layer: &MoeLayer = &guard;
        let cache = &handle.cache;
        if ext.is_empty() {
            let target = if layer.lora().is_some() {
                GradTarget::Owned
            } else {
                GradTarget::Skip
            };
            py.detach(|| layer.backward(cache, gos, ghs, gws, target))
                .py_err(py)
        } else {
            let mut it = ext.iter().map(|a| a.slice_mut::<f32>());
            let bufs = [(); 6].map(|_| it.next().expect("six tensors"));
            py.detach(|| {
                layer.backward(
                    cache,
                    gos,
                    ghs,
                    gws,
                    GradTarget::External { bufs, accumulate },
                )
            })
            .py_err(py)
        }
    }

    /// A DLPack capsule viewing LoRA matrix `name` (f32 `[E, rows, cols]`, Rust-owned).
    fn lora_weight<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let guard = self.layer();
        let (l, m) = lora_matrix(&guard, name)?;
        export_f32(py, l.weight(m), &l.shape(m))
    }

    /// A DLPack capsule viewing the layer-owned gradient of LoRA matrix `name`.
    fn lora_grad<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let guard = self.layer();
        let (l, m) = lora_matrix(&guard, name)?;
        export_f32(py, l.grad(m), &l.shape(m))
    }

    /// Copies f32 values into LoRA matrix `name`.
    fn set_lora_weight(
        &self,
        py: Python<'_>,
        name: &str,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let guard = self.layer();
        let (l, m) = lora_matrix(&guard, name)?;
        let v = TensorArg::new(name, value, DType::F32, &l.shape(m).map(Some))?;
        l.set(m, v.f32s()).py_err(py)
    }

    /// Replaces the layer's LoRA with a fresh one (PEFT init), or removes it (rank 0).
    #[pyo3(signature = (lora_rank, lora_alpha=None, use_rslora=false, seed=0))]
    fn set_lora(
        &mut self,
        py: Python<'_>,
        lora_rank: usize,
        lora_alpha: Option<f32>,
        use_rslora: bool,
        seed: u64,
    ) -> PyResult<()> {
        self.layer_mut(py)?
            .set_lora(lora_config(lora_rank, lora_alpha, use_rslora), seed)
            .py_err(py)
    }

    /// Zeroes the layer-owned LoRA gradients.
    fn zero_lora_grads(&self) {
        if let Some(l) = self.layer().lora() {
            l.zero_grads();
        }
    }

    /// Shape `[E, rows, cols]` of LoRA matrix `name`.
    fn lora_shape(&self, name: &str) -> PyResult<Vec<usize>> {
        let guard = self.layer();
        let (l, m) = lora_matrix(&guard, name)?;
        Ok(l.shape(m).to_vec())
    }

    #[staticmethod]
    fn lora_names() -> Vec<&'static str> {
        names()
    }

    #[getter]
    fn isa(&self) -> &'static str {
        self.layer().isa().name()
    }

    #[setter(isa)]
    fn set_isa(&mut self, py: Python<'_>, isa: &str) -> PyResult<()> {
        let isa = parse_isa(py, Some(isa))?;
        self.layer_mut(py)?.set_isa(isa).py_err(py)
    }

    #[getter]
    fn threads(&self) -> usize {
        self.layer().threads()
    }

    #[setter(threads)]
    fn set_threads(&mut self, py: Python<'_>, threads: usize) -> PyResult<()> {
        if threads == 0 {
            return Err(PyValueError::new_err("`threads` must be at least 1"));
        }
        self.layer_mut(py)?.set_threads(threads);
        Ok(())
    }

    #[getter]
    fn num_experts(&self) -> usize {
        self.layer().config.experts
    }
    #[getter]
    fn hidden_size(&self) -> usize {
        self.layer().config.hidden
    }
    #[getter]
    fn intermediate_size(&self) -> usize {
        self.layer().config.intermediate
    }
    #[getter]
    fn lora_rank(&self) -> usize {
        self.layer().lora().map_or(0, |l| l.config.rank)
    }
    #[getter]
    fn lora_alpha(&self) -> Option<f32> {
        self.layer().lora().map(|l| l.config.alpha)
    }
    #[getter]
    fn lora_scaling(&self) -> f32 {
        self.layer().lora().map_or(0.0, |l| l.config.scaling())
    }
    #[getter]
    fn use_rslora(&self) -> bool {
        self.layer().lora().is_some_and(|l| l.config.use_rslora)
    }
    /// Bytes of packed expert weights in Rust memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.layer().weight_bytes()
    }
    /// Bytes of LoRA weights plus gradients in Rust memory.
    #[getter]
    fn lora_bytes(&self) -> usize {
        self.layer().lora().map_or(0, |l| l.bytes())
    }

    fn __repr__(&self) -> String {
        let c = self.layer().config;
        format!(
            "Experts(num_experts={}, hidden_size={}, intermediate_size={}, lora_rank={}, isa='{}', threads={})",
            c.experts,
            c.hidden,
            c.intermediate,
            self.lora_rank(),
            self.isa(),
            self.threads()
        )
    }
}

impl Experts {
    fn wrap(layer: MoeLayer) -> Experts {
        Experts {
            layer: Arc::new(RwLock::new(layer)),
        }
    }

    /// The layer, for reading (a poisoned lock is harmless here: the layer has no
    /// invariant a panicking reader could break).
    pub(crate) fn layer(&self) -> RwLockReadGuard<'_, MoeLayer> {
        self.layer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The layer for the decode host functions.
    pub(crate) fn shared_layer(&self) -> Arc<RwLock<MoeLayer>> {
        self.layer.clone()
    }

    /// The layer, for changing it. A decode graph's host function may be running the
    /// forward on a driver thread: wait for it with the GIL released, for up to a minute.
    fn layer_mut(&self, py: Python<'_>) -> PyResult<RwLockWriteGuard<'_, MoeLayer>> {
        let t0 = std::time::Instant::now();
        loop {
            match self.layer.try_write() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if t0.elapsed() > std::time::Duration::from_secs(60) {
                return Err(crate::error::KtrsError::new_err(
                    "the experts are busy in a running forward (a CUDA graph's host node?) for over a minute",
                ));
            }
            py.detach(|| std::thread::sleep(std::time::Duration::from_micros(50)));
        }
    }

    /// One expert's weights in HF layout: gate, up `[I, H]`, down `[H, I]`, bf16.
    fn expert_args<'py>(
        &self,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
        down: &Bound<'py, PyAny>,
    ) -> PyResult<[TensorArg<'py>; 3]> {
        let c = self.layer().config;
        let (h, i) = (Some(c.hidden), Some(c.intermediate));
        Ok([
            TensorArg::new("gate", gate, DType::BF16, &[i, h])?,
            TensorArg::new("up", up, DType::BF16, &[i, h])?,
            TensorArg::new("down", down, DType::BF16, &[h, i])?,
        ])
    }
}

/// LoRA matrix `name` of `layer` (an error if the layer has no LoRA or no such matrix).
fn lora_matrix<'a>(
    layer: &'a MoeLayer,
    name: &str,
) -> PyResult<(&'a ktrs::LoraWeights, LoraMatrix)> {
    let l = layer
        .lora()
        .ok_or_else(|| PyValueError::new_err("this layer has no LoRA (lora_rank=0)"))?;
    let m = LoraMatrix::from_name(name).map_err(|e| PyTypeError::new_err(e.to_string()))?;
    Ok((l, m))
}

fn names() -> Vec<&'static str> {
    LoraMatrix::ALL.iter().map(|m| m.name()).collect()
}

#[pymethods]
impl ForwardHandle {
    #[getter]
    fn tokens(&self) -> usize {
        self.cache.tokens()
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.cache.top_k()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.cache.bytes()
    }
    fn __repr__(&self) -> String {
        format!("{:?}", self.cache)
    }
}
