//! ktrs core: the routed experts of one Mixture-of-Experts layer (SwiGLU) with LoRA,
//! forward and backward, on the CPU.
//!
//! This crate knows nothing about Python. It owns every byte a kernel reads: packed
//! expert weights, LoRA master weights and gradients, forward caches and scratch.
//! Callers hand in plain slices and get results written into slices they own.
//!
//! Layout of the crate:
//! - [`cpu`]: CPUID/XCR0 detection and the [`Isa`] choice.
//! - [`pool`]: the persistent worker pool every layer call runs on.
//! - [`fp8`]: block-wise fp8 → bf16 dequantisation of quantised checkpoints.
//! - [`pack`]: the VNNI panel layout the GEMM kernels read (shared by AVX-512 and AMX).
//! - [`kernels`]: GEMM micro-kernels per ISA behind one dispatch function.
//! - [`load`]: routed experts from safetensors shards into a layer, in parallel.
//! - [`lora`]: Rust-owned LoRA weights and gradients.
//! - [`moe`]: routing, the forward and backward passes, and the forward cache.
//! - [`tuning`]: the kernels' speed knobs and their measured defaults.
//! - [`optim`]: the AdamW step over Rust-owned LoRA weights (state owned here too).
//! - [`cuda`]: the decode hand-off (stream channel, host functions) and pinned memory,
//!   with the driver opened at run time (nothing else needs CUDA).

pub mod bf16;
pub mod buffer;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod fp8;
pub mod kernels;
pub mod load;
pub mod lora;
pub mod moe;
pub mod optim;
pub mod pack;
pub mod pool;
pub mod tuning;

pub use cpu::{CpuFeatures, Isa};
pub use error::{KtrsError, Result};
pub use lora::{LoraConfig, LoraMatrix, LoraWeights};
pub use moe::{ExpertWeights, ForwardCache, GradTarget, MoeConfig, MoeLayer};
pub use pool::ThreadPool;
