//! Small f32 vector helpers for LoRA (rank r ≪ hidden) and the SwiGLU epilogues.
//!
//! Each helper is written once as plain Rust and compiled twice by `multiversion!`: as is
//! (the portable path) and with AVX-512 enabled, where LLVM vectorises the inner loops.
//! LoRA math stays in f32: the matrices are tiny next to the base GEMMs, and f32 keeps the
//! adapter gradients as accurate as PEFT's.

use crate::bf16::to_f32;
use crate::cpu::Isa;

macro_rules! multiversion {
    ($(#[$m:meta])* pub(crate) fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match isa {
                Isa::Scalar => body($($arg),*),
                // SAFETY: a non-scalar Isa reaches kernels only after check_available().
                Isa::Avx512 | Isa::Amx => unsafe { avx512($($arg),*) },
            }
        }
    };
}

multiversion! {
    /// `out[j] = Σ_c x[c] · m[j, c]` for `j < rows`, `c < k` (x bf16, m f32 row-major [rows, k]).
    pub(crate) fn project(x: &[u16], m: &[f32], rows: usize, k: usize, out: &mut [f32]) {
        let x = &x[..k];
        for j in 0..rows {
            let mrow = &m[j * k..(j + 1) * k];
            let mut acc = [0f32; 16];
            let mut xc = x.chunks_exact(16);
            let mut mc = mrow.chunks_exact(16);
            for (xa, ma) in (&mut xc).zip(&mut mc) {
                for l in 0..16 {
                    acc[l] += to_f32(xa[l]) * ma[l];
                }
            }
            let mut s: f32 = acc.iter().sum();
            for (a, b) in xc.remainder().iter().zip(mc.remainder()) {
                s += to_f32(*a) * b;
            }
            out[j] = s;
        }
    }
}

multiversion! {
    /// `out[c] += alpha · Σ_j v[j] · m[j·ld + c]` for `c < k` (r rows of stride `ld`).
    pub(crate) fn combine_rows(alpha: f32, v: &[f32], m: &[f32], ld: usize, r: usize, k: usize, out: &mut [f32]) {
        let out = &mut out[..k];
        for j in 0..r {
            let f = alpha * v[j];
            if f == 0.0 {
                continue;
            }
            let mrow = &m[j * ld..j * ld + k];
            for c in 0..k {
                out[c] += f * mrow[c];
            }
        }
    }
}

multiversion! {
    /// `Σ_c a[c] · bf16(x[c])`.
    pub(crate) fn dot_f32_bf16(a: &[f32], x: &[u16], k: usize) -> f32 {
        let mut acc = [0f32; 16];
        let (a, x) = (&a[..k], &x[..k]);
        let mut ac = a.chunks_exact(16);
        let mut xc = x.chunks_exact(16);
        for (aa, xa) in (&mut ac).zip(&mut xc) {
            for l in 0..16 {
                acc[l] += aa[l] * to_f32(xa[l]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (p, q) in ac.remainder().iter().zip(xc.remainder()) {
            s += p * to_f32(*q);
        }
        s
    }
}

multiversion! {
    /// `out[c] += w · y[c]` over f32 rows (the top-k weighted sum).
    pub(crate) fn axpy(w: f32, y: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(y) {
            *o += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::from_f32;

    #[test]
    fn helpers_agree_across_isas() {
        let (r, k) = (5, 37);
        let x: Vec<u16> = (0..k).map(|i| from_f32((i as f32 * 0.37).sin())).collect();
        let m: Vec<f32> = (0..r * k).map(|i| (i as f32 * 0.11).cos()).collect();
        for isa in Isa::available() {
            let mut out = vec![0f32; r];
            project(isa, &x, &m, r, k, &mut out);
            for j in 0..r {
                let e: f32 = (0..k).map(|c| to_f32(x[c]) * m[j * k + c]).sum();
                assert!((out[j] - e).abs() < 1e-4, "{isa}");
            }
            let mut o2 = vec![1f32; k];
            combine_rows(isa, 0.5, &out, &m, k, r, k, &mut o2);
            for c in 0..k {
                let e: f32 = 1.0 + 0.5 * (0..r).map(|j| out[j] * m[j * k + c]).sum::<f32>();
                assert!((o2[c] - e).abs() < 1e-4);
            }
            let d = dot_f32_bf16(isa, &m[..k], &x, k);
            let e: f32 = (0..k).map(|c| m[c] * to_f32(x[c])).sum();
            assert!((d - e).abs() < 1e-4);
        }
    }
}
