//! The one map from an [`Isa`] to the code it runs: a [`KernelSet`] per tier, chosen in
//! [`KernelSet::of`], and `multiversion!`, which compiles portable code once per set of
//! target features.
//!
//! Soundness rests on an invariant kept here: every function in a tier's set needs only
//! CPU features that tier's [`Isa::check_available`] checks. Layers check their `Isa`
//! before any kernel runs, so the wrappers that call through a set (after their bounds
//! checks) only have to name this invariant.

use super::epilogue::{BwdPanel, FwdPanel};
use super::lora_grad::{self, GradSum};
use super::{amx_gemm, avx2, avx512, epilogue, scalar, vec, Gemm, TransposedGemm};
use crate::cpu::Isa;
use crate::pack::PackShape;

/// A compiled copy of portable code: the target features LLVM may vectorise it with.
/// `multiversion!` defines one function per variant.
#[derive(Clone, Copy)]
pub(super) enum Portable {
    Scalar,
    Avx2,
    Avx512f,
    Avx512,
}

/// One tier's kernels, each behind the bounds checks of the function of the same name in
/// `kernels` (or its submodule). Function pointers rather than a type per tier behind a
/// trait, which would make every caller generic over the tier or pick the type with a
/// `match` of its own; the indirect call happens once per GEMM block, 16-column epilogue,
/// LoRA-gradient sum or block of projected rows, never per element.
// The field types are the kernels' signatures: they read best where they are used.
#[allow(clippy::type_complexity)]
pub(super) struct KernelSet {
    /// The copy of the `multiversion!` helpers that no tier hand-writes (`vec::axpy`, ...).
    pub(super) portable: Portable,
    pub(super) gemm: unsafe fn(Gemm<'_>),
    pub(super) gemm_transposed: unsafe fn(TransposedGemm<'_>),
    pub(super) transpose_block: unsafe fn(&[u16], PackShape, usize, usize, &mut [u16]),
    pub(super) swiglu_fwd: unsafe fn(FwdPanel<'_>),
    pub(super) swiglu_bwd: unsafe fn(BwdPanel<'_>),
    pub(super) lora_grad: unsafe fn(GradSum<'_>, &mut [f32]),
    pub(super) project_rows: unsafe fn(&[u16], usize, usize, &[f32], usize, usize, &mut [f32]),
    pub(super) add_low_rank: unsafe fn(&vec::LowRank<'_>, usize, &mut [f32], usize),
}

impl KernelSet {
    #[inline]
    pub(super) fn of(isa: Isa) -> &'static KernelSet {
        match isa {
            Isa::Scalar => &SCALAR,
            Isa::Avx2 => &AVX2,
            Isa::Avx512f => &AVX512F,
            Isa::Avx512 => &AVX512,
            Isa::Amx => &AMX,
        }
    }
}

/// The reference the other tiers are tested against (`f32::exp` in the epilogues).
const SCALAR: KernelSet = KernelSet {
    portable: Portable::Scalar,
    gemm: scalar::gemm,
    gemm_transposed: scalar::gemm_transposed,
    transpose_block: scalar::pack_transposed_block,
    swiglu_fwd: epilogue::swiglu_fwd_scalar,
    swiglu_bwd: epilogue::swiglu_bwd_scalar,
    lora_grad: lora_grad::portable::scalar,
    project_rows: vec::project_rows_portable::scalar,
    add_low_rank: vec::add_low_rank_portable::scalar,
};

const AVX2: KernelSet = KernelSet {
    portable: Portable::Avx2,
    gemm: avx2::gemm,
    gemm_transposed: avx2::gemm_transposed,
    transpose_block: avx2::pack_transposed_block,
    swiglu_fwd: epilogue::swiglu_fwd_poly::avx2,
    swiglu_bwd: epilogue::swiglu_bwd_poly::avx2,
    lora_grad: lora_grad::portable::avx2,
    project_rows: vec::project_rows_portable::avx2,
    add_low_rank: vec::add_low_rank_portable::avx2,
};

/// The AVX2 GEMM in zmm registers; the kernels that need AVX-512 F/BW/VL but not BF16
/// (transposed product and repack, LoRA-A projections) are the AVX-512 ones.
const AVX512F: KernelSet = KernelSet {
    portable: Portable::Avx512f,
    gemm: avx2::gemm_avx512f,
    gemm_transposed: avx512::gemm_transposed,
    transpose_block: avx512::pack_transposed_block,
    swiglu_fwd: epilogue::swiglu_fwd_poly::avx512f,
    swiglu_bwd: epilogue::swiglu_bwd_poly::avx512f,
    lora_grad: lora_grad::portable::avx512f,
    project_rows: vec::project_rows_avx512,
    add_low_rank: vec::add_low_rank_avx512,
};

const AVX512: KernelSet = KernelSet {
    portable: Portable::Avx512,
    gemm: avx512::gemm,
    gemm_transposed: avx512::gemm_transposed,
    transpose_block: avx512::pack_transposed_block,
    swiglu_fwd: epilogue::avx512::swiglu_fwd,
    swiglu_bwd: epilogue::avx512::swiglu_bwd,
    lora_grad: lora_grad::body_avx512,
    project_rows: vec::project_rows_avx512,
    add_low_rank: vec::add_low_rank_avx512,
};

/// Only the GEMM uses tiles; everything else is AVX-512 BF16 (which AMX CPUs have).
const AMX: KernelSet = KernelSet {
    gemm: amx_gemm,
    ..AVX512
};

/// Compiles a portable body once per [`Portable`] copy: as is for `Scalar`, and with each
/// vector copy's target features enabled, where LLVM vectorises the inner loops for that
/// register width. The only place that maps copies to target features.
///
/// `mod $name(args..) { body }` defines module `$name` holding `scalar`, `avx2`,
/// `avx512f` and `avx512`, for [`KernelSet`] entries. `fn $name(args..) { body }` also
/// defines `fn $name(isa: Isa, args..)`, which runs the copy `KernelSet::of(isa)` names.
/// The body sees its module's items through `use super::*` (so it must not use `super::`
/// paths itself).
macro_rules! multiversion {
    ($(#[$m:meta])* mod $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        // A `KernelSet` may take only some of the copies.
        #[allow(clippy::too_many_arguments, dead_code)]
        pub(in $crate::kernels) mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            pub(in $crate::kernels) fn scalar($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(in $crate::kernels) unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
            pub(in $crate::kernels) unsafe fn avx512f($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
            pub(in $crate::kernels) unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::kernels::dispatch::multiversion! {
            mod $name($($arg: $ty),*) $(-> $ret)? $body
        }
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::cpu::Isa, $($arg: $ty),*) $(-> $ret)? {
            use $crate::kernels::dispatch::{KernelSet, Portable};
            match KernelSet::of(isa).portable {
                Portable::Scalar => $name::scalar($($arg),*),
                // SAFETY: `KernelSet::of(isa)` names a copy whose features `isa` has, and
                // `isa` was checked available by the caller's layer (`kernels::dispatch`).
                Portable::Avx2 => unsafe { $name::avx2($($arg),*) },
                // SAFETY: as above.
                Portable::Avx512f => unsafe { $name::avx512f($($arg),*) },
                // SAFETY: as above.
                Portable::Avx512 => unsafe { $name::avx512($($arg),*) },
            }
        }
    };
}
pub(crate) use multiversion;
