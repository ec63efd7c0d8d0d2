//! `load_experts`: routed experts from safetensors shards straight into a layer
//! (`ktrs::load`), for `ktrs.from_pretrained`, with the GIL released while it reads.

use crate::error::{guard, type_err, IntoPy};
use crate::experts::Experts;
use ktrs::load::{self, DType, ExpertSource, Scale, Shards, Span, Tensor};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Mutex;

/// (key, shard, offset, bytes, block) of a float8 tensor's float32 scales.
type ScaleArg = (String, usize, u64, u64, (usize, usize));
/// (key, shard, offset, bytes, safetensors dtype, shape, scale or None).
type TensorArg = (
    String,
    usize,
    u64,
    u64,
    String,
    Vec<usize>,
    Option<ScaleArg>,
);
/// (expert, gate, up, down).
type ExpertArg = (usize, TensorArg, TensorArg, TensorArg);

fn tensor(t: TensorArg) -> PyResult<Tensor> {
    let (key, file, offset, bytes, dtype, shape, scale) = t;
    Ok(Tensor {
        dtype: DType::parse(&dtype, &key).py_err()?,
        span: Span {
            file,
            offset,
            bytes,
        },
        shape,
        scale: scale.map(|(key, file, offset, bytes, (bn, bk))| Scale {
            key,
            span: Span {
                file,
                offset,
                bytes,
            },
            block: [bn, bk],
        }),
        key,
    })
}

/// Reads and packs `experts` into `layer` from the shard files `paths`, many experts at
/// once on the layer's threads. Each expert is (index, gate, up, down), each projection
/// (key, shard index, byte offset, byte count, safetensors dtype, shape, scale), a
/// float8 one's scale (key, shard index, byte offset, byte count, (bn, bk)).
/// `progress(n)` is called as experts finish; an exception from it stops the load.
#[pyfunction]
#[pyo3(signature = (layer, paths, experts, *, progress=None))]
pub fn load_experts(
    py: Python<'_>,
    layer: &Bound<'_, Experts>,
    paths: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    guard(|| {
        let paths: Vec<PathBuf> = paths
            .extract()
            .map_err(|e| type_err(format!("`paths` must be a list of file paths: {e}")))?;
        let experts: Vec<ExpertArg> = experts.extract().map_err(|e| {
            type_err(format!(
                "`experts` must be a list of (expert, gate, up, down) sources: {e}"
            ))
        })?;
        let sources = experts
            .into_iter()
            .map(|(expert, g, u, d)| {
                Ok(ExpertSource {
                    expert,
                    gate: tensor(g)?,
                    up: tensor(u)?,
                    down: tensor(d)?,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let shards = Shards::open(&paths).py_err()?;
        let raised: Mutex<Option<PyErr>> = Mutex::new(None);
        let report = |n: usize| {
            let Some(f) = &progress else { return true };
            Python::attach(|py| f.call1(py, (n,)).map(drop))
                .map_err(|e| {
                    *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                })
                .is_ok()
        };
        let layer = layer.borrow();
        let mut held = layer.layer_mut()?;
        let target: &mut ktrs::MoeLayer = &mut held;
        let done = py.detach(|| load::load_experts(target, &shards, &sources, &report));
        match raised.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => done.py_err(),
        }
    })
}
