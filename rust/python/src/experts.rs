//! `Experts`: one layer's routed experts (a `ktrs::MoeLayer`), and `ForwardHandle`, the
//! saved state of one forward.

use crate::dlpack::{export_f32, export_raw, DType, TensorArg};
use crate::error::{guard, type_err, value_err, wrong_type, IntoPy};
use ktrs::buffer::Buffer;
use ktrs::{
    ExpertWeights, ForwardCache, GradTarget, Isa, LoraConfig, LoraMatrix, LoraWeights, MoeConfig,
    MoeLayer,
};
use pyo3::prelude::*;
use pyo3::types::PyBool;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[pyclass(module = "ktrs._native", name = "Experts")]
pub struct Experts {
    /// Shared with the decode hand-offs (`HostStage`), which run the forward on another
    /// thread without the GIL; the lock keeps them and the mutating methods apart.
    layer: Arc<RwLock<MoeLayer>>,
}

/// What one forward saved for its backward. Dropping it frees the memory.
#[pyclass(module = "ktrs._native", name = "ForwardHandle", frozen, weakref)]
pub struct ForwardHandle {
    cache: ForwardCache,
}

fn parse_isa(isa: Option<&str>) -> PyResult<Isa> {
    match isa {
        None | Some("auto") => Isa::from_env_or_best().py_err(),
        Some(name) => {
            let isa: Isa = name.parse().py_err()?;
            isa.check_available().py_err()?;
            Ok(isa)
        }
    }
}

/// A Python int in `min..=max` as usize; anything else names `arg` and the range. Integer
/// arguments are taken as objects so that a negative or huge value gets a ktrs error
/// with the argument's name rather than pyo3's bare `OverflowError`.
pub(crate) fn int_arg(
    arg: &str,
    obj: &Bound<'_, PyAny>,
    min: usize,
    max: usize,
) -> PyResult<usize> {
    let index = if obj.is_instance_of::<PyBool>() {
        None
    } else {
        obj.call_method0("__index__").ok()
    };
    let Some(index) = index else {
        return Err(wrong_type(arg, "an integer", obj));
    };
    let v: Option<i128> = index.extract().ok();
    v.and_then(|v| usize::try_from(v).ok())
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| {
            value_err(format!(
                "`{arg}` must be an integer from {min} to {max}, got {index}"
            ))
        })
}

pub(crate) fn opt_int_arg(
    arg: &str,
    obj: Option<&Bound<'_, PyAny>>,
    min: usize,
    max: usize,
) -> PyResult<Option<usize>> {
    match obj {
        Some(o) if !o.is_none() => int_arg(arg, o, min, max).map(Some),
        _ => Ok(None),
    }
}

fn str_arg(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.extract::<String>()
        .map_err(|_| wrong_type(arg, "a str", obj))
}

fn opt_str_arg(arg: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match obj {
        Some(o) if !o.is_none() => str_arg(arg, o).map(Some),
        _ => Ok(None),
    }
}

/// LoRA alpha: a finite real number (None: the rank).
fn alpha_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f32>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let v: f64 = o
        .extract()
        .map_err(|_| wrong_type("lora_alpha", "a number", o))?;
    if !v.is_finite() || v.abs() > f32::MAX as f64 {
        return Err(value_err(format!(
            "`lora_alpha` must be a finite number, got {v}"
        )));
    }
    Ok(Some(v as f32))
}

fn bool_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    obj.map_or(Ok(false), |o| o.is_truthy())
}

/// Seeds are any int; only their low 64 bits matter.
fn seed_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(0);
    };
    int_arg("seed", o, 0, u64::MAX as usize).map(|v| v as u64)
}

/// The largest LoRA rank or layer size accepted as an argument; larger values cannot be
/// allocated anyway and would only reach the size checks as overflows.
const MAX_SIZE: usize = 1 << 48;

fn lora_config(rank: usize, alpha: Option<f32>, use_rslora: bool) -> Option<LoraConfig> {
    (rank > 0).then(|| LoraConfig {
        rank,
        alpha: alpha.unwrap_or(rank as f32),
        use_rslora,
    })
}

/// Whether address ranges `[x0, x1)` and `[y0, y1)` share a byte.
fn overlaps((x0, x1): (usize, usize), (y0, y1): (usize, usize)) -> bool {
    x0 < y1 && y0 < x1
}

/// Bf16 token rows, `[T, H]` (T = `t`, or any when None), as forward and backward take them.
fn token_rows<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    t: Option<usize>,
    h: usize,
) -> PyResult<TensorArg<'py>> {
    TensorArg::new(arg, obj, DType::BF16, &[t, Some(h)])
}

/// F32 routing weights (or their gradient), `[T, k]`.
fn routing_weights<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
    t: usize,
    k: usize,
) -> PyResult<TensorArg<'py>> {
    TensorArg::new(arg, obj, DType::F32, &[Some(t), Some(k)])
}

/// Refuses arguments that share memory when one of them is written: the kernels write
/// outputs from several threads while they read the inputs.
fn no_overlap(
    written: &[(&str, &TensorArg<'_>, usize)],
    all: &[(&str, &TensorArg<'_>, usize)],
) -> PyResult<()> {
    for a in written {
        for b in all {
            if std::ptr::eq(a.1, b.1) {
                continue;
            }
            if overlaps(a.1.addr_range(a.2), b.1.addr_range(b.2)) {
                return Err(value_err(format!(
                    "`{}` must not share memory with `{}`",
                    a.0, b.0
                )));
            }
        }
    }
    Ok(())
}

#[pymethods]
impl Experts {
    /// Packs bf16 weights `gate [E, I, H]`, `up [E, I, H]`, `down [E, H, I]` into Rust memory.
    #[new]
    #[pyo3(signature = (gate, up, down, *, lora_rank=None, lora_alpha=None, use_rslora=None, isa=None, threads=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
        lora_rank: Option<&Bound<'_, PyAny>>,
        lora_alpha: Option<&Bound<'_, PyAny>>,
        use_rslora: Option<&Bound<'_, PyAny>>,
        isa: Option<&Bound<'_, PyAny>>,
        threads: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        guard(|| {
            let g = TensorArg::new("gate", gate, DType::BF16, &[None, None, None])?;
            let (e, i, h) = (g.shape[0], g.shape[1], g.shape[2]);
            let u = TensorArg::new("up", up, DType::BF16, &[Some(e), Some(i), Some(h)])?;
            let d = TensorArg::new("down", down, DType::BF16, &[Some(e), Some(h), Some(i)])?;
            let opts = LayerArgs::parse(lora_rank, lora_alpha, use_rslora, isa, threads, seed)?;
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
            let layer = py
                .detach(|| MoeLayer::new(cfg, w, opts.lora, opts.isa, opts.threads, opts.seed))
                .py_err()?;
            Ok(Experts::wrap(layer))
        })
    }

    /// A layer with zero weights, to be filled expert by expert with `set_expert`
    /// (streaming loads never hold more than one expert outside Rust).
    #[staticmethod]
    #[pyo3(signature = (experts, hidden, intermediate, *, lora_rank=None, lora_alpha=None, use_rslora=None, isa=None, threads=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn empty(
        experts: &Bound<'_, PyAny>,
        hidden: &Bound<'_, PyAny>,
        intermediate: &Bound<'_, PyAny>,
        lora_rank: Option<&Bound<'_, PyAny>>,
        lora_alpha: Option<&Bound<'_, PyAny>>,
        use_rslora: Option<&Bound<'_, PyAny>>,
        isa: Option<&Bound<'_, PyAny>>,
        threads: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        guard(|| {
            let cfg = MoeConfig {
                experts: int_arg("num_experts", experts, 1, MAX_SIZE)?,
                hidden: int_arg("hidden_size", hidden, 1, MAX_SIZE)?,
                intermediate: int_arg("intermediate_size", intermediate, 1, MAX_SIZE)?,
            };
            let o = LayerArgs::parse(lora_rank, lora_alpha, use_rslora, isa, threads, seed)?;
            let layer = MoeLayer::new_empty(cfg, o.lora, o.isa, o.threads, o.seed).py_err()?;
            Ok(Experts::wrap(layer))
        })
    }

    /// Packs expert `expert`'s bf16 weights (gate, up `[I, H]`, down `[H, I]`).
    fn set_expert(
        &mut self,
        py: Python<'_>,
        expert: &Bound<'_, PyAny>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard(|| {
            let (expert, [g, u, d]) = self.expert_args(expert, gate, up, down)?;
            let (gs, us, ds) = (g.u16s(), u.u16s(), d.u16s());
            let mut held = self.layer_mut()?;
            let layer: &mut MoeLayer = &mut held;
            py.detach(|| layer.set_expert(expert, gs, us, ds)).py_err()
        })
    }

    /// Writes expert `expert`'s weights into bf16 tensors gate, up `[I, H]`, down `[H, I]`.
    fn get_expert(
        &self,
        expert: &Bound<'_, PyAny>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard(|| {
            let (expert, [g, u, d]) = self.expert_args(expert, gate, up, down)?;
            let all = [("gate", &g, 2), ("up", &u, 2), ("down", &d, 2)];
            no_overlap(&all, &all)?;
            let (gv, uv, dv) = self.layer().get_expert(expert).py_err()?;
            g.slice_mut::<u16>().copy_from_slice(&gv);
            u.slice_mut::<u16>().copy_from_slice(&uv);
            d.slice_mut::<u16>().copy_from_slice(&dv);
            Ok(())
        })
    }

    /// Forward of the routed experts into `out` (bf16 `[T, H]`); returns a handle for
    /// backward when `save_for_backward`. `use_lora=False` runs the base experts although
    /// the layer has LoRA (PEFT's `disable_adapter`); that handle's backward gives no
    /// LoRA gradients.
    #[pyo3(signature = (hidden, topk_ids, topk_weights, out, *, save_for_backward=None, use_lora=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        save_for_backward: Option<&Bound<'_, PyAny>>,
        use_lora: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<ForwardHandle>> {
        guard(|| {
            let save = bool_arg(save_for_backward)?;
            let use_lora = use_lora.map_or(Ok(true), |o| o.is_truthy())?;
            let h = self.layer().config.hidden;
            let x = token_rows("hidden_states", hidden, None, h)?;
            let t = x.shape[0];
            let ids = TensorArg::new("topk_ids", topk_ids, DType::I64, &[Some(t), None])?;
            let k = ids.shape[1];
            let w = routing_weights("topk_weights", topk_weights, t, k)?;
            let o = token_rows("out", out, Some(t), h)?;
            no_overlap(
                &[("out", &o, 2)],
                &[
                    ("hidden_states", &x, 2),
                    ("topk_ids", &ids, 8),
                    ("topk_weights", &w, 4),
                ],
            )?;
            let (xs, is, ws, os) = (x.u16s(), ids.i64s(), w.f32s(), o.slice_mut::<u16>());
            let held = self.layer();
            let layer: &MoeLayer = &held;
            let cache = py
                .detach(|| layer.forward_with(xs, t, is, ws, k, os, save, use_lora))
                .py_err()?;
            Ok(cache.map(|cache| ForwardHandle { cache }))
        })
    }

    /// Backward from `grad_output` (bf16 `[T, H]`): writes `grad_hidden` (bf16 `[T, H]`)
    /// and `grad_topk_weights` (f32 `[T, k]`). LoRA gradients go into `lora_grads` (six
    /// f32 tensors in `lora_names()` order; overwritten, or added to with `accumulate`),
    /// or, when `lora_grads` is None, are added to the layer's own gradient buffers.
    /// A handle made before `set_lora` raises `StaleHandleError`.
    #[pyo3(signature = (handle, grad_output, grad_hidden, grad_topk_weights, *, lora_grads=None, accumulate=None))]
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        py: Python<'_>,
        handle: &Bound<'_, PyAny>,
        grad_output: &Bound<'_, PyAny>,
        grad_hidden: &Bound<'_, PyAny>,
        grad_topk_weights: &Bound<'_, PyAny>,
        lora_grads: Option<&Bound<'_, PyAny>>,
        accumulate: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        guard(|| {
            let handle = handle.cast::<ForwardHandle>().map_err(|_| {
                let want = "the ForwardHandle of a forward with save_for_backward=True";
                wrong_type("handle", want, handle)
            })?;
            let cache = &handle.get().cache;
            let held_for_backward = self.layer();
            let layer_ref: &MoeLayer = &held_for_backward;
            layer_ref.check_cache(cache).py_err()?;
            let accumulate = bool_arg(accumulate)?;
            let (t, k, h) = (cache.tokens(), cache.top_k(), layer_ref.config.hidden);
            let go = token_rows("grad_output", grad_output, Some(t), h)?;
            let gh = token_rows("grad_hidden", grad_hidden, Some(t), h)?;
            let gw = routing_weights("grad_topk_weights", grad_topk_weights, t, k)?;
            let mut ext = Vec::new();
            let mut names_ext = Vec::new();
            if let Some(list) = lora_grads.filter(|o| !o.is_none()) {
                let lora = layer_ref
                    .lora()
                    .ok_or_else(|| value_err("`lora_grads` given, but this layer has no LoRA"))?;
                let items: Vec<Bound<'_, PyAny>> = list
                    .try_iter()
                    .and_then(|it| it.collect::<PyResult<Vec<_>>>())
                    .map_err(|_| type_err("`lora_grads` must be a sequence of 6 tensors"))?;
                if items.len() != 6 {
                    return Err(value_err(format!(
                        "`lora_grads` must hold 6 tensors ({}), got {}",
                        names().join(", "),
                        items.len()
                    )));
                }
                for (m, obj) in LoraMatrix::ALL.iter().zip(items.iter()) {
                    let shape = lora.shape(*m).map(Some);
                    names_ext.push(format!("lora_grads[{}]", m.name()));
                    ext.push(TensorArg::new(
                        names_ext.last().unwrap(),
                        obj,
                        DType::F32,
                        &shape,
                    )?);
                }
            }
            let mut written = vec![("grad_hidden", &gh, 2), ("grad_topk_weights", &gw, 4)];
            written.extend(names_ext.iter().zip(&ext).map(|(n, a)| (n.as_str(), a, 4)));
            let mut all = written.clone();
            all.push(("grad_output", &go, 2));
            no_overlap(&written, &all)?;
            if let Some(l) = layer_ref.lora() {
                for (n, a) in names_ext.iter().zip(&ext) {
                    for m in LoraMatrix::ALL {
                        let b = l.weight(m);
                        let start = b.as_ptr() as usize;
                        if overlaps(a.addr_range(4), (start, start + b.len() * 4)) {
                            return Err(value_err(format!(
                                "`{n}` must not share memory with the layer's LoRA weight {}",
                                m.name()
                            )));
                        }
                    }
                }
            }
            let (gos, ghs, gws) = (go.u16s(), gh.slice_mut::<u16>(), gw.slice_mut::<f32>());
            let layer: &MoeLayer = layer_ref;
            if ext.is_empty() {
                let target = if layer.lora().is_some() {
                    GradTarget::Owned
                } else {
                    GradTarget::Skip
                };
                py.detach(|| layer.backward(cache, gos, ghs, gws, target))
                    .py_err()
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
                .py_err()
            }
        })
    }

    /// A DLPack capsule viewing LoRA matrix `name` (f32 `[E, rows, cols]`, Rust-owned).
    fn lora_weight<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.export_lora(py, name, LoraWeights::weight)
    }

    /// A DLPack capsule viewing the packed weights of `"gate_up"` or `"down"`: bf16
    /// `[E, panels, k_pad / 2, 16, 2]`, element `[e, p, j, l, b]` = W_e[16p + l, 2j + b]
    /// (`rust/ktrs/src/pack.rs`; gate_up interleaves gate and up panels). The view keeps
    /// the layer alive. For reading only: the kernels read this memory.
    fn packed_weights<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let which = str_arg("name", name)?;
            let down = match which.as_str() {
                "gate_up" => false,
                "down" => true,
                _ => {
                    return Err(value_err(format!(
                        "`name` must be 'gate_up' or 'down', got {which:?}"
                    )))
                }
            };
            let held = self.layer();
            let pack = held.packed_weights(down);
            let sh = pack.shape;
            let shape = [
                pack.experts,
                sh.panels(),
                sh.k_pad / 2,
                ktrs::pack::PANEL,
                2,
            ];
            let data = pack.as_slice();
            // SAFETY: `data` holds exactly `shape` u16 (bf16) and lives as long as the
            // layer, which the owner Arc keeps; packed buffers are written in place, never
            // reallocated.
            unsafe {
                export_raw(
                    py,
                    self.shared_layer(),
                    data.as_ptr() as *mut u8,
                    DType::BF16,
                    &shape,
                )
            }
        })
    }

    /// A DLPack capsule viewing the layer-owned gradient of LoRA matrix `name`.
    fn lora_grad<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.export_lora(py, name, LoraWeights::grad)
    }

    /// Copies f32 values into LoRA matrix `name`.
    fn set_lora_weight(&self, name: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        guard(|| {
            let held = self.layer();
            let (l, m) = Self::lora_matrix(&held, name)?;
            let v = TensorArg::new(m.name(), value, DType::F32, &l.shape(m).map(Some))?;
            l.set(m, v.f32s()).py_err()
        })
    }

    /// Replaces the layer's LoRA with a fresh one (PEFT init), or removes it (rank 0).
    /// Forward handles made before this are refused by `backward` from now on.
    #[pyo3(signature = (lora_rank, lora_alpha=None, use_rslora=None, seed=None))]
    fn set_lora(
        &mut self,
        lora_rank: &Bound<'_, PyAny>,
        lora_alpha: Option<&Bound<'_, PyAny>>,
        use_rslora: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        guard(|| {
            let rank = int_arg("lora_rank", lora_rank, 0, MAX_SIZE)?;
            let cfg = lora_config(rank, alpha_arg(lora_alpha)?, bool_arg(use_rslora)?);
            self.layer_mut()?.set_lora(cfg, seed_arg(seed)?).py_err()
        })
    }

    /// Frees the transposed expert weights kept for the backward; the next backward
    /// refills them (within `KTRS_TRANSPOSED_CACHE_MB`).
    fn clear_transposed_cache(&self) -> PyResult<()> {
        guard(|| {
            self.layer_mut()?.clear_transposed_cache();
            Ok(())
        })
    }

    /// Zeroes the layer-owned LoRA gradients.
    fn zero_lora_grads(&self) {
        if let Some(l) = self.layer().lora() {
            l.zero_grads();
        }
    }

    /// Shape `[E, rows, cols]` of LoRA matrix `name`.
    fn lora_shape(&self, name: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
        guard(|| {
            let held = self.layer();
            let (l, m) = Self::lora_matrix(&held, name)?;
            Ok(l.shape(m).to_vec())
        })
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
    fn set_isa(&mut self, isa: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        guard(|| {
            let name = opt_str_arg("isa", isa)?;
            let isa = parse_isa(name.as_deref())?;
            self.layer_mut()?.set_isa(isa).py_err()
        })
    }

    #[getter]
    fn threads(&self) -> usize {
        self.layer().threads()
    }

    /// Same rule as the constructor's `threads=`: 1 to `MAX_THREADS`; None means
    /// `KTRS_THREADS` or one per physical core.
    #[setter(threads)]
    fn set_threads(&mut self, threads: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        guard(|| {
            let n = threads_arg(threads)?;
            self.layer_mut()?.set_threads(n).py_err()
        })
    }

    /// LoRA generation: changes with every `set_lora` (a handle from an older one is stale).
    #[getter]
    fn lora_generation(&self) -> u64 {
        self.layer().lora_generation()
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
    /// Bytes of transposed expert weights kept for the backward (filled by backward
    /// calls within `KTRS_TRANSPOSED_CACHE_MB`, shared by all layers; 0 when off).
    #[getter]
    fn transposed_cache_bytes(&self) -> usize {
        self.layer().transposed_cache_bytes()
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

/// The layer options shared by `Experts(...)` and `Experts.empty(...)`, validated.
struct LayerArgs {
    lora: Option<LoraConfig>,
    isa: Isa,
    threads: usize,
    seed: u64,
}

impl LayerArgs {
    fn parse(
        lora_rank: Option<&Bound<'_, PyAny>>,
        lora_alpha: Option<&Bound<'_, PyAny>>,
        use_rslora: Option<&Bound<'_, PyAny>>,
        isa: Option<&Bound<'_, PyAny>>,
        threads: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<LayerArgs> {
        let rank = opt_int_arg("lora_rank", lora_rank, 0, MAX_SIZE)?.unwrap_or(0);
        let lora = lora_config(rank, alpha_arg(lora_alpha)?, bool_arg(use_rslora)?);
        let isa = parse_isa(opt_str_arg("isa", isa)?.as_deref())?;
        Ok(LayerArgs {
            lora,
            isa,
            threads: threads_arg(threads)?,
            seed: seed_arg(seed)?,
        })
    }
}

/// A `threads=` argument: 1 to `MAX_THREADS`; None means `KTRS_THREADS` or one per
/// physical core.
fn threads_arg(threads: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    let requested = opt_int_arg("threads", threads, 1, ktrs::pool::MAX_THREADS)?;
    ktrs::pool::resolve_threads(requested).py_err()
}

/// The thread count a layer made with `threads=threads` uses (None: `KTRS_THREADS`, else
/// one per physical core); raises what the constructor would for a bad value, so
/// front ends (the CLI) can report a bad `KTRS_THREADS` before loading anything.
#[pyfunction]
#[pyo3(name = "resolve_threads", signature = (threads=None))]
pub fn py_resolve_threads(threads: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    guard(|| threads_arg(threads))
}

impl Experts {
    /// Expert `expert`'s index and weights in HF layout: gate, up `[I, H]`, down `[H, I]`,
    /// bf16.
    fn expert_args<'py>(
        &self,
        expert: &Bound<'_, PyAny>,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
        down: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, [TensorArg<'py>; 3])> {
        let c = self.layer().config;
        let expert = int_arg("expert", expert, 0, c.experts - 1)?;
        let (h, i) = (Some(c.hidden), Some(c.intermediate));
        let weights = [
            TensorArg::new("gate", gate, DType::BF16, &[i, h])?,
            TensorArg::new("up", up, DType::BF16, &[i, h])?,
            TensorArg::new("down", down, DType::BF16, &[h, i])?,
        ];
        Ok((expert, weights))
    }

    fn wrap(layer: MoeLayer) -> Experts {
        Experts {
            layer: Arc::new(RwLock::new(layer)),
        }
    }

    /// The layer, for reading (a poisoned lock is harmless: readers change nothing).
    pub(crate) fn layer(&self) -> RwLockReadGuard<'_, MoeLayer> {
        self.layer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The layer for the decode hand-offs, which run its forward on another thread.
    pub(crate) fn shared_layer(&self) -> Arc<RwLock<MoeLayer>> {
        self.layer.clone()
    }

    /// The layer, for changing it. A decode hand-off may be running its forward on
    /// another thread: wait for it with the GIL released, for up to a minute.
    pub(crate) fn layer_mut(&self) -> PyResult<RwLockWriteGuard<'_, MoeLayer>> {
        let t0 = std::time::Instant::now();
        loop {
            match self.layer.try_write() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if t0.elapsed() > std::time::Duration::from_secs(60) {
                return Err(crate::error::KtrsError::new_err(
                    "the experts are busy in a running forward (a decode graph's hand-off?) for over a minute",
                ));
            }
            Python::attach(|py| {
                py.detach(|| std::thread::sleep(std::time::Duration::from_micros(50)))
            });
        }
    }

    fn lora_matrix<'a>(
        layer: &'a MoeLayer,
        name: &Bound<'_, PyAny>,
    ) -> PyResult<(&'a LoraWeights, LoraMatrix)> {
        let name = str_arg("name", name)?;
        let m = LoraMatrix::from_name(&name).py_err()?;
        let l = layer
            .lora()
            .ok_or_else(|| value_err("this layer has no LoRA (lora_rank=0)"))?;
        Ok((l, m))
    }

    /// A DLPack capsule viewing the buffer `which` picks (weight or gradient) of LoRA
    /// matrix `name`.
    fn export_lora<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'_, PyAny>,
        which: fn(&LoraWeights, LoraMatrix) -> &Arc<Buffer<f32>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let held = self.layer();
            let (l, m) = Self::lora_matrix(&held, name)?;
            export_f32(py, which(l, m), &l.shape(m))
        })
    }
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
    /// LoRA rank the forward applied (0: none, or switched off for that call).
    #[getter]
    fn lora_rank(&self) -> usize {
        self.cache.lora_rank()
    }
    /// The layer's LoRA generation at the forward.
    #[getter]
    fn lora_generation(&self) -> u64 {
        self.cache.lora_generation()
    }
    fn __repr__(&self) -> String {
        format!("{:?}", self.cache)
    }
}
