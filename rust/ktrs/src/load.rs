//! Routed experts straight from safetensors shards into a layer's packed weights.
//!
//! The caller (`ktrs.from_pretrained`) parses the shard headers and knows each family's
//! key names; here an expert's projection is a byte range of a shard with a dtype and a
//! shape. Each task of the layer's pool takes one (expert, projection) a strip of rows at
//! a time: it reads the strip with `pread` into its worker's reusable buffer, converts it
//! to bf16 where needed (f16, f32, or fp8 with its block scales), and packs it into the
//! layer with the code `set_expert` uses, so the packed bytes are the same. Tasks run in
//! the order the bytes lie in the shards.
//!
//! `pread` rather than a memory map: the copy out of the page cache costs about what the
//! faults of a mapping cost, the buffers stay in cache while they are packed, nothing of
//! the shard counts as resident afterwards, and a shard truncated during a load is an
//! error rather than a SIGBUS.

use crate::bf16;
use crate::error::{checked_size, KtrsError, Result};
use crate::fp8::{self, Fp8Format};
use crate::moe::{MoeLayer, PackTarget, Proj};
use crate::pack::PANEL;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

// Shards are little-endian; tensors are read into memory as they lie in the file.
const _: () = assert!(cfg!(target_endian = "little"));

/// Element types of expert tensors in safetensors files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    F8E4M3,
    F8E5M2,
}

impl DType {
    /// The safetensors names, in `DType` order.
    pub const NAMES: [&'static str; 5] = ["BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"];
    const ALL: [DType; 5] = [
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// The dtype a safetensors header calls `name`; other dtypes are refused, naming `key`.
    pub fn parse(name: &str, key: &str) -> Result<DType> {
        match Self::NAMES.iter().position(|n| *n == name) {
            Some(i) => Ok(Self::ALL[i]),
            None => Err(KtrsError::checkpoint(
                key,
                format!(
                    "dtype {name} is not supported for routed experts (ktrs reads {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    fn fp8(self) -> Option<Fp8Format> {
        match self {
            DType::F8E4M3 => Some(Fp8Format::E4M3Fn),
            DType::F8E5M2 => Some(Fp8Format::E5M2),
            _ => None,
        }
    }
}

/// `bytes` bytes at byte `offset` of shard `file` (an index into [`Shards`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub file: usize,
    pub offset: u64,
    pub bytes: u64,
}

/// The float32 block scales of a float8 tensor: `[⌈n/bn⌉, ⌈k/bk⌉]`, `block = [bn, bk]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    pub key: String,
    pub span: Span,
    pub block: [usize; 2],
}

/// One projection's weight in a shard: `key` names it in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub key: String,
    pub span: Span,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Required for float8 tensors, refused for others.
    pub scale: Option<Scale>,
}

/// Where expert `expert`'s three projections lie: gate, up `[I, H]`, down `[H, I]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSource {
    pub expert: usize,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// The shard files of a load, opened once.
pub struct Shards {
    files: Vec<(PathBuf, File, u64)>,
}

impl Shards {
    pub fn open(paths: &[PathBuf]) -> Result<Shards> {
        let files = paths
            .iter()
            .map(|p| {
                let f = File::open(p)
                    .map_err(|e| KtrsError::System(format!("cannot open {}: {e}", p.display())))?;
                let len = f
                    .metadata()
                    .map_err(|e| KtrsError::System(format!("cannot stat {}: {e}", p.display())))?
                    .len();
                Ok((p.clone(), f, len))
            })
            .collect::<Result<_>>()?;
        Ok(Shards { files })
    }

    /// Checks that `span` lies inside its shard (a shorter file is a truncated one).
    fn check(&self, key: &str, span: Span) -> Result<()> {
        let Some((path, _, len)) = self.files.get(span.file) else {
            return Err(KtrsError::checkpoint(
                key,
                format!("shard {} of {} does not exist", span.file, self.files.len()),
            ));
        };
        match span.offset.checked_add(span.bytes) {
            Some(end) if end <= *len => Ok(()),
            _ => Err(KtrsError::checkpoint(
                key,
                format!(
                    "needs bytes {}..{} of {}, which has {len}: the shard is truncated",
                    span.offset,
                    span.offset as u128 + span.bytes as u128,
                    path.display()
                ),
            )),
        }
    }

    fn read(&self, key: &str, span: Span, dst: &mut [u8]) -> Result<()> {
        let (path, file, _) = &self.files[span.file];
        file.read_exact_at(dst, span.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                KtrsError::checkpoint(
                    key,
                    format!(
                        "{} ended before byte {} (truncated while loading?)",
                        path.display(),
                        span.offset + span.bytes
                    ),
                )
            } else {
                KtrsError::System(format!("{key}: reading {}: {e}", path.display()))
            }
        })
    }
}

/// One task: projection `proj` of `source.expert`, the `slot`-th expert of the call.
struct Task<'a> {
    slot: usize,
    expert: usize,
    proj: Proj,
    tensor: &'a Tensor,
}

/// A worker's reusable buffers (allocated once per call, grown to the largest strip).
#[derive(Default)]
struct Scratch {
    raw: Vec<u8>,
    bf16: Vec<u16>,
    scale: Vec<u8>,
    scale_f32: Vec<f32>,
}

/// Reads and packs `experts` into `layer` on its pool, many at once. `progress(n)` is
/// called on the calling thread as experts finish, with the number newly finished, from
/// inside a job of the pool (so it must not call into ktrs); returning false stops the
/// load (the layer then holds some of the experts, and the error says so). Everything that can be checked (expert indices, shapes, dtypes, byte counts,
/// scales, ranges inside the shards) is checked before anything is read.
pub fn load_experts(
    layer: &mut MoeLayer,
    shards: &Shards,
    experts: &[ExpertSource],
    progress: &(dyn Fn(usize) -> bool + Sync),
) -> Result<()> {
    let c = layer.config;
    let mut tasks = Vec::with_capacity(3 * experts.len());
    let mut seen = vec![false; c.experts];
    for (slot, src) in experts.iter().enumerate() {
        let x = src.expert;
        if x >= c.experts || std::mem::replace(&mut seen[x], true) {
            let why = if x >= c.experts {
                format!("an expert below {}", c.experts)
            } else {
                "each expert once".into()
            };
            return Err(KtrsError::invalid("expert", why, x));
        }
        for (proj, tensor) in [
            (Proj::Gate, &src.gate),
            (Proj::Up, &src.up),
            (Proj::Down, &src.down),
        ] {
            tasks.push(Task {
                slot,
                expert: x,
                proj,
                tensor,
            });
        }
    }
    let target = layer.pack_target(experts.iter().map(|s| s.expert));
    for t in &tasks {
        check_tensor(shards, t.tensor, target.shape(t.proj))?;
    }
    // In file order: the reads of all workers together sweep each shard front to back.
    tasks.sort_by_key(|t| (t.tensor.span.file, t.tensor.span.offset));
    run(&target, shards, &tasks, experts.len(), progress)
}

fn check_tensor(shards: &Shards, t: &Tensor, want: [usize; 2]) -> Result<()> {
    let key = &t.key;
    if t.shape != want {
        return Err(KtrsError::checkpoint(
            key,
            format!("shape {:?}, the layer needs {want:?}", t.shape),
        ));
    }
    let bytes = checked_size(key, &[want[0], want[1], t.dtype.size()])?;
    if t.span.bytes != bytes as u64 {
        return Err(KtrsError::checkpoint(
            key,
            format!(
                "{} bytes on disk, shape {want:?} {} needs {bytes}",
                t.span.bytes,
                t.dtype.name()
            ),
        ));
    }
    shards.check(key, t.span)?;
    match (&t.scale, t.dtype.fp8()) {
        (None, None) => Ok(()),
        (Some(s), Some(_)) => {
            let [bn, bk] = s.block;
            if bn == 0 || bk == 0 {
                return Err(KtrsError::checkpoint(
                    &s.key,
                    format!("blocks of {:?}: block sizes must be positive", s.block),
                ));
            }
            let grid = [want[0].div_ceil(bn), want[1].div_ceil(bk)];
            let bytes = checked_size(&s.key, &[grid[0], grid[1], 4])? as u64;
            if s.span.bytes != bytes {
                return Err(KtrsError::checkpoint(
                    &s.key,
                    format!(
                        "{} bytes on disk, float32 scales {grid:?} for {want:?} in blocks of {:?} need {bytes}",
                        s.span.bytes, s.block
                    ),
                ));
            }
            shards.check(&s.key, s.span)
        }
        (None, Some(_)) => Err(KtrsError::checkpoint(
            key,
            format!("{} needs its block scales", t.dtype.name()),
        )),
        (Some(s), None) => Err(KtrsError::checkpoint(
            &s.key,
            format!("a scale for {key}, which is {}, not float8", t.dtype.name()),
        )),
    }
}

fn run(
    target: &PackTarget<'_>,
    shards: &Shards,
    tasks: &[Task<'_>],
    experts: usize,
    progress: &(dyn Fn(usize) -> bool + Sync),
) -> Result<()> {
    let scratch: Vec<Mutex<Scratch>> = (0..target.pool.threads())
        .map(|_| Mutex::default())
        .collect();
    let left: Vec<AtomicU8> = (0..experts).map(|_| AtomicU8::new(3)).collect();
    let (done, reported) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<KtrsError>> = Mutex::new(None);
    let fail = |e: KtrsError| {
        stop.store(true, Relaxed);
        first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };
    // Only the calling thread (worker 0) reports, so `progress` may take Python's GIL.
    let report = || {
        let now = done.load(Relaxed);
        let new = now - reported.swap(now, Relaxed);
        if new > 0 && !progress(new) {
            fail(KtrsError::System("the load was stopped".into()));
        }
    };
    target.pool.run(tasks.len(), |n, worker| {
        if stop.load(Relaxed) {
            return;
        }
        let t = &tasks[n];
        let mut s = scratch[worker].lock().unwrap_or_else(|p| p.into_inner());
        let pack = |rows, w: &[u16]| {
            // SAFETY: (expert, projection) pairs are unique (checked by `load_experts`),
            // so this task alone writes these panels.
            unsafe { target.pack_rows(t.expert, t.proj, rows, w) }
        };
        if let Err(e) = load_one(shards, t.tensor, target.shape(t.proj), &mut s, pack) {
            return fail(e);
        }
        if left[t.slot].fetch_sub(1, Relaxed) == 1 {
            done.fetch_add(1, Relaxed);
        }
        if worker == 0 {
            report();
        }
    });
    if !stop.load(Relaxed) {
        report();
    }
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Rows read, converted to bf16 and packed at a time: a whole projection (5.8 MB in bf16
/// for [1408, 2048], 2.9 MB in fp8) overflows L2, so reading or converting it all before
/// packing writes it to memory and reads it back; a strip ([128, 2048]: 256 KB of fp8,
/// 512 KB of bf16) is converted and packed while it is still in cache. A multiple of the
/// 16-row panel, so strips split no panel.
const STRIP_ROWS: usize = 128;
const _: () = assert!(STRIP_ROWS.is_multiple_of(PANEL));

/// Reads `t` (`shape`, checked) a strip of rows at a time into `s` and hands each strip's
/// bf16 values to `pack(rows, values)`, in row order.
fn load_one(
    shards: &Shards,
    t: &Tensor,
    shape: [usize; 2],
    s: &mut Scratch,
    mut pack: impl FnMut(Range<usize>, &[u16]),
) -> Result<()> {
    let [n, k] = shape;
    let size = t.dtype.size();
    if let Some(scale) = &t.scale {
        // Read whole, not by strip: a few KB at most, and a strip may span block rows.
        let sb = scale.span.bytes as usize;
        grow(&mut s.scale, sb)?;
        shards.read(&scale.key, scale.span, &mut s.scale[..sb])?;
        s.scale_f32.clear();
        s.scale_f32.extend(
            s.scale[..sb]
                .chunks_exact(4)
                .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]])),
        );
    }
    let strip = STRIP_ROWS.min(n);
    grow(&mut s.bf16, strip * k)?;
    if t.dtype != DType::BF16 {
        grow(&mut s.raw, strip * k * size)?;
    }
    for r0 in (0..n).step_by(STRIP_ROWS) {
        let rows = r0..(r0 + STRIP_ROWS).min(n);
        let span = Span {
            offset: t.span.offset + (r0 * k * size) as u64,
            bytes: (rows.len() * k * size) as u64,
            ..t.span
        };
        let out = &mut s.bf16[..rows.len() * k];
        if t.dtype == DType::BF16 {
            // Nothing to convert: the strip is packed from where it was read.
            shards.read(&t.key, span, as_bytes_mut(out))?;
        } else {
            let src = &mut s.raw[..span.bytes as usize];
            shards.read(&t.key, span, src)?;
            convert(t, shape, rows.clone(), src, &s.scale_f32, out)?;
        }
        pack(rows, out);
    }
    Ok(())
}

/// Rows `rows` of `t` (`shape`), read as `src`, into bf16 `out`; `scales` are its float8
/// block scales.
fn convert(
    t: &Tensor,
    shape: [usize; 2],
    rows: Range<usize>,
    src: &[u8],
    scales: &[f32],
    out: &mut [u16],
) -> Result<()> {
    match (t.dtype, &t.scale) {
        (DType::F32, _) => {
            for (o, v) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = bf16::from_f32(f32::from_le_bytes([v[0], v[1], v[2], v[3]]));
            }
        }
        (DType::F16, _) => {
            for (o, v) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_f32(f16_to_f32(u16::from_le_bytes([v[0], v[1]])));
            }
        }
        (dtype, Some(scale)) => {
            let format = dtype
                .fp8()
                .expect("checked: a scale only comes with float8");
            fp8::dequantize_rows(format, src, shape, scales, scale.block, rows, out)?;
        }
        (dtype, None) => unreachable!("checked: {dtype:?} without a scale is f16 or f32"),
    }
    Ok(())
}

/// Grows `v` to at least `len` elements, reporting a refused allocation as an error.
fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> Result<()> {
    if v.len() < len {
        v.try_reserve_exact(len - v.len())
            .map_err(|_| KtrsError::OutOfMemory {
                what: "a loader buffer".into(),
                bytes: (len * std::mem::size_of::<T>()) as u128,
            })?;
        v.resize(len, T::default());
    }
    Ok(())
}

fn as_bytes_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: the bytes of `v` exactly; u8 needs no alignment and any bytes are a u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 2) }
}

/// IEEE half → f32, exactly (every half is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let (exp, man) = (u32::from((h >> 10) & 0x1f), u32::from(h & 0x3ff));
    let mag = match exp {
        0 => man as f32 * f32::from_bits(0x3380_0000), // subnormal: man · 2^-24
        31 => f32::from_bits(0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(((exp + 112) << 23) | (man << 13)),
    };
    f32::from_bits(mag.to_bits() | sign)
}

#[cfg(test)]
mod tests;
