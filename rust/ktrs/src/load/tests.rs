//! The loader against `set_expert` on the same values: packed bytes identical, for every
//! dtype, experts spread over files in any order; and every refusal names the key.

use super::*;
use crate::lora::SplitMix64;
use crate::moe::MoeConfig;
use crate::Isa;
use std::path::Path;

const CFG: MoeConfig = MoeConfig {
    experts: 5,
    hidden: 40,
    intermediate: 24,
};

/// Files being written in a fresh directory, removed on drop.
struct Files {
    dir: PathBuf,
    data: Vec<Vec<u8>>,
}

impl Files {
    fn new(n: usize) -> Files {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ktrs-load-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Files {
            dir,
            data: vec![vec![0xee; 8]; n],
        }
    }

    /// Appends `bytes` to file `file` (after a gap, as between safetensors tensors).
    fn put(&mut self, file: usize, bytes: &[u8]) -> Span {
        let d = &mut self.data[file];
        d.extend_from_slice(&[0xee; 6]);
        let offset = d.len() as u64;
        d.extend_from_slice(bytes);
        Span {
            file,
            offset,
            bytes: bytes.len() as u64,
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        (0..self.data.len())
            .map(|f| self.dir.join(format!("shard-{f}")))
            .collect()
    }

    fn open(&self) -> Shards {
        for (p, d) in self.paths().iter().zip(&self.data) {
            std::fs::write(p, d).unwrap();
        }
        Shards::open(&self.paths()).unwrap()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn layer(threads: usize) -> MoeLayer {
    layer_of(CFG, threads)
}

fn layer_of(cfg: MoeConfig, threads: usize) -> MoeLayer {
    MoeLayer::new_empty(cfg, None, Isa::Scalar, threads, 0).unwrap()
}

/// Values a checkpoint may hold, as f32 (bf16-exact or not).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut g = SplitMix64(seed);
    (0..n)
        .map(|_| ((g.next_f64() * 2.0 - 1.0) * 3.0) as f32)
        .collect()
}

fn shape(cfg: MoeConfig, p: Proj) -> [usize; 2] {
    match p {
        Proj::Down => [cfg.hidden, cfg.intermediate],
        _ => [cfg.intermediate, cfg.hidden],
    }
}

const PROJS: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

fn tensor(key: String, span: Span, dtype: DType, shape: [usize; 2]) -> Tensor {
    Tensor {
        key,
        span,
        dtype,
        shape: shape.to_vec(),
        scale: None,
    }
}

fn source(expert: usize, mut t: Vec<Tensor>) -> ExpertSource {
    let down = t.pop().unwrap();
    let up = t.pop().unwrap();
    let gate = t.pop().unwrap();
    ExpertSource {
        expert,
        gate,
        up,
        down,
    }
}

/// Writes every expert's projections as `dtype` (spread over `files` files, experts in
/// reverse order, projections of one expert in different files) and returns the
/// sources with the bf16 values `set_expert` must get. Float8 blocks that do not divide
/// the dims: partial last blocks both ways.
fn write(f: &mut Files, dtype: DType) -> (Vec<ExpertSource>, Vec<[Vec<u16>; 3]>) {
    write_shaped(f, dtype, CFG, [16, 17])
}

/// [`write`] for a layer of `cfg`, float8 in blocks of `block`.
fn write_shaped(
    f: &mut Files,
    dtype: DType,
    cfg: MoeConfig,
    block: [usize; 2],
) -> (Vec<ExpertSource>, Vec<[Vec<u16>; 3]>) {
    let files = f.data.len();
    let mut sources = Vec::new();
    let mut want = Vec::new();
    for x in (0..cfg.experts).rev() {
        let mut ts = Vec::new();
        let mut ws: [Vec<u16>; 3] = Default::default();
        for (j, &p) in PROJS.iter().enumerate() {
            let [n, k] = shape(cfg, p);
            let v = values(n * k, (x * 3 + j) as u64);
            let file = (x + j) % files;
            let key = format!("experts.{x}.{p:?}");
            let (bytes, bf): (Vec<u8>, Vec<u16>) = match dtype {
                DType::BF16 => {
                    let b: Vec<u16> = v.iter().map(|&v| bf16::from_f32(v)).collect();
                    (b.iter().flat_map(|v| v.to_le_bytes()).collect(), b)
                }
                DType::F32 => (
                    v.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    v.iter().map(|&v| bf16::from_f32(v)).collect(),
                ),
                DType::F16 => {
                    // Every half bit pattern class: normal, subnormal, zero, inf, NaN.
                    let h: Vec<u16> = (0..n * k).map(|i| (i as u16).wrapping_mul(40503)).collect();
                    let b = h.iter().map(|&h| bf16::from_f32(f16_to_f32(h))).collect();
                    (h.iter().flat_map(|v| v.to_le_bytes()).collect(), b)
                }
                DType::F8E4M3 | DType::F8E5M2 => {
                    let w8: Vec<u8> = (0..n * k).map(|i| (i * 37 + x) as u8).collect();
                    let grid = [n.div_ceil(block[0]), k.div_ceil(block[1])];
                    let s = values(grid[0] * grid[1], 99 + x as u64);
                    let mut out = vec![0u16; n * k];
                    let format = dtype.fp8().unwrap();
                    fp8::dequantize_bf16(format, &w8, [n, k], &s, block, &mut out, None).unwrap();
                    let sb: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
                    // The scale in another file than its weight.
                    let span = f.put((file + 1) % files, &sb);
                    let scale = Some(Scale {
                        key: format!("{key}_scale_inv"),
                        span,
                        block,
                    });
                    let span = f.put(file, &w8);
                    ws[j] = out;
                    ts.push(Tensor {
                        scale,
                        ..tensor(key, span, dtype, [n, k])
                    });
                    continue;
                }
            };
            let span = f.put(file, &bytes);
            ts.push(tensor(key, span, dtype, [n, k]));
            ws[j] = bf;
        }
        sources.push(source(x, ts));
        want.push(ws);
    }
    (sources, want)
}

fn all(_: usize) -> bool {
    true
}

#[test]
fn packs_the_bytes_set_expert_packs_for_every_dtype() {
    for dtype in [
        DType::BF16,
        DType::F32,
        DType::F16,
        DType::F8E4M3,
        DType::F8E5M2,
    ] {
        for threads in [1, 3] {
            let mut f = Files::new(2);
            let (sources, want) = write(&mut f, dtype);
            let shards = f.open();
            let mut got = layer(threads);
            load_experts(&mut got, &shards, &sources, &all).unwrap();
            let mut reference = layer(1);
            for (s, [g, u, d]) in sources.iter().zip(&want) {
                reference.set_expert(s.expert, g, u, d).unwrap();
            }
            for x in 0..CFG.experts {
                assert!(got.packed(x) == reference.packed(x), "{dtype:?} expert {x}");
            }
        }
    }
}

#[test]
fn strips_pack_the_bytes_set_expert_packs() {
    // The loader reads and converts `STRIP_ROWS` rows at a time: strips that end inside a
    // block and inside a panel (300 = 2·128 + 44 rows, 136 = 128 + 8); float8 blocks
    // shorter than a strip and not a multiple of the 16-row panel (24), taller than a
    // strip and not a multiple of it (200: the second strip starts in one block row and
    // ends in the next), one scale for the whole tensor.
    let cfg = MoeConfig {
        experts: 2,
        hidden: 300,
        intermediate: 136,
    };
    let float8 = [[128, 128], [24, 40], [200, 40], [1000, 1000]].map(|b| (DType::F8E4M3, b));
    let others = [DType::BF16, DType::F32, DType::F16].map(|d| (d, [1, 1]));
    for (dtype, block) in float8.into_iter().chain(others) {
        let mut f = Files::new(2);
        let (sources, want) = write_shaped(&mut f, dtype, cfg, block);
        let shards = f.open();
        let mut got = layer_of(cfg, 2);
        load_experts(&mut got, &shards, &sources, &all).unwrap();
        let mut reference = layer_of(cfg, 1);
        for (s, [g, u, d]) in sources.iter().zip(&want) {
            reference.set_expert(s.expert, g, u, d).unwrap();
        }
        for x in 0..cfg.experts {
            assert!(
                got.packed(x) == reference.packed(x),
                "{dtype:?} {block:?} expert {x}"
            );
        }
    }
}

#[test]
fn fused_slices_and_a_subset_of_experts() {
    // transformers-5 fused tensors: each expert's gate and up are halves of one
    // [E, 2I, H] tensor, its down a slice of [E, H, I]; only experts 1 and 3 are loaded.
    let (e, h, i) = (CFG.experts, CFG.hidden, CFG.intermediate);
    let gu: Vec<u16> = values(e * 2 * i * h, 1)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let dn: Vec<u16> = values(e * h * i, 2)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let bytes = |v: &[u16]| v.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut f = Files::new(1);
    let gspan = f.put(0, &bytes(&gu));
    let dspan = f.put(0, &bytes(&dn));
    let slice = |s: Span, at: usize, len: usize, key: &str, p: Proj| {
        let span = Span {
            offset: s.offset + 2 * at as u64,
            bytes: 2 * len as u64,
            ..s
        };
        tensor(key.into(), span, DType::BF16, shape(CFG, p))
    };
    let sources: Vec<ExpertSource> = [3, 1]
        .iter()
        .map(|&x| {
            let g = slice(gspan, x * 2 * i * h, i * h, "gate_up_proj", Proj::Gate);
            let u = slice(gspan, (x * 2 + 1) * i * h, i * h, "gate_up_proj", Proj::Up);
            let d = slice(dspan, x * h * i, h * i, "down_proj", Proj::Down);
            source(x, vec![g, u, d])
        })
        .collect();
    let shards = f.open();
    let mut got = layer(2);
    load_experts(&mut got, &shards, &sources, &all).unwrap();
    let mut reference = layer(1);
    for x in [1, 3] {
        let (g, u) = gu[x * 2 * i * h..(x + 1) * 2 * i * h].split_at(i * h);
        reference
            .set_expert(x, g, u, &dn[x * h * i..(x + 1) * h * i])
            .unwrap();
    }
    for x in 0..e {
        assert!(got.packed(x) == reference.packed(x), "expert {x}");
    }
}

#[test]
fn progress_counts_every_expert_and_can_stop_the_load() {
    let mut f = Files::new(2);
    let (sources, _) = write(&mut f, DType::BF16);
    let shards = f.open();
    let seen = AtomicUsize::new(0);
    let count = |n: usize| {
        seen.fetch_add(n, Relaxed);
        true
    };
    load_experts(&mut layer(2), &shards, &sources, &count).unwrap();
    assert_eq!(seen.load(Relaxed), CFG.experts);
    let stop = |_: usize| false;
    let e = load_experts(&mut layer(1), &shards, &sources, &stop).unwrap_err();
    assert!(e.to_string().contains("stopped"), "{e}");
}

fn problem(sources: &[ExpertSource], shards: &Shards) -> String {
    load_experts(&mut layer(2), shards, sources, &all)
        .unwrap_err()
        .to_string()
}

#[test]
fn refusals_name_the_key_and_the_expectation() {
    let mut f = Files::new(2);
    let (sources, _) = write(&mut f, DType::BF16);
    let shards = f.open();
    let edit = |change: &dyn Fn(&mut ExpertSource)| {
        let mut s = sources.clone();
        change(&mut s[1]);
        problem(&s, &shards)
    };
    let key = &sources[1].up.key;
    let msg = edit(&|s| s.up.shape = vec![CFG.hidden, CFG.intermediate]);
    assert!(
        msg.starts_with(key) && msg.contains("shape [40, 24], the layer needs [24, 40]"),
        "{msg}"
    );
    let msg = edit(&|s| s.up.dtype = DType::F32);
    assert!(
        msg.starts_with(key) && msg.contains("1920 bytes on disk, shape [24, 40] F32 needs 3840"),
        "{msg}"
    );
    let msg = edit(&|s| s.up.span.offset = 1 << 40);
    assert!(
        msg.starts_with(key) && msg.contains("the shard is truncated"),
        "{msg}"
    );
    let msg = edit(&|s| s.up.span.file = 7);
    assert!(
        msg.starts_with(key) && msg.contains("shard 7 of 2"),
        "{msg}"
    );
    let msg = edit(&|s| {
        s.up.dtype = DType::F8E4M3;
        s.up.span.bytes /= 2;
    });
    assert!(
        msg.starts_with(key) && msg.contains("F8_E4M3 needs its block scales"),
        "{msg}"
    );
    let msg = edit(&|s| {
        s.up.scale = Some(Scale {
            key: "the_scale".into(),
            span: s.gate.span,
            block: [8, 8],
        })
    });
    assert!(
        msg.starts_with("the_scale: a scale for") && msg.contains("BF16, not float8"),
        "{msg}"
    );
    let msg = edit(&|s| {
        s.up.dtype = DType::F8E4M3;
        s.up.span.bytes /= 2;
        s.up.scale = Some(Scale {
            key: "the_scale".into(),
            span: Span {
                bytes: 12,
                ..s.up.span
            },
            block: [8, 8],
        })
    });
    assert!(
        msg.starts_with("the_scale: 12 bytes on disk, float32 scales [3, 5]")
            && msg.contains("need 60"),
        "{msg}"
    );
    let msg = edit(&|s| s.expert = 99);
    assert!(msg.contains("an expert below 5, got 99"), "{msg}");
    let msg = edit(&|s| s.expert = sources[0].expert);
    assert!(msg.contains("each expert once"), "{msg}");
    let e = DType::parse("I8", "experts.0.w").unwrap_err().to_string();
    assert!(e.contains("experts.0.w: dtype I8 is not supported for routed experts (ktrs reads BF16, F16, F32, F8_E4M3, F8_E5M2)"), "{e}");
    assert!(matches!(
        Shards::open(&[Path::new("/nonexistent/shard").into()]),
        Err(KtrsError::System(m)) if m.contains("/nonexistent/shard")
    ));
}

#[test]
fn a_shard_truncated_during_the_load_is_an_error_naming_the_key() {
    let mut f = Files::new(1);
    let (sources, _) = write(&mut f, DType::BF16);
    let shards = f.open();
    let last = sources
        .iter()
        .flat_map(|s| [&s.gate, &s.up, &s.down])
        .max_by_key(|t| t.span.offset)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.paths()[0])
        .unwrap()
        .set_len(last.span.offset + 10)
        .unwrap();
    let msg = problem(&sources, &shards);
    assert!(
        msg.starts_with(&last.key) && msg.contains("ended before byte"),
        "{msg}"
    );
}

#[test]
fn halves_convert_exactly() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
}
