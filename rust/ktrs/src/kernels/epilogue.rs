//! SwiGLU epilogues on one panel (16 columns): the element-wise work between the GEMMs.
//! The vector tiers use a vectorised exp (range reduction + degree-6 polynomial + a
//! power of two), since `f32::exp` per element cost as much as the GEMMs at large T:
//! hand-written for AVX-512 (`vscalefps`), portable Rust that LLVM vectorises for the
//! others. `Scalar` keeps `f32::exp`: it is the reference.

use super::KernelSet;
use crate::bf16;
use crate::cpu::Isa;
use crate::pack::PANEL;

/// The arguments of [`swiglu_fwd`] for the kernels: whole panels.
pub(super) struct FwdPanel<'a> {
    gate: &'a [f32; PANEL],
    up: &'a [f32; PANEL],
    g_out: &'a mut [u16; PANEL],
    u_out: &'a mut [u16; PANEL],
    a_out: &'a mut [u16; PANEL],
}

/// The arguments of [`swiglu_bwd`] for the kernels: whole panels.
pub(super) struct BwdPanel<'a> {
    w: f32,
    da: &'a [f32; PANEL],
    g: &'a [u16; PANEL],
    u: &'a [u16; PANEL],
    dg_out: &'a mut [u16; PANEL],
    du_out: &'a mut [u16; PANEL],
}

/// The first 16 elements, as an array: kernels on it need no bounds checks (panics on a
/// shorter slice).
#[inline(always)]
fn panel<T>(s: &[T]) -> &[T; PANEL] {
    s.first_chunk().expect("a whole panel")
}

#[inline(always)]
fn panel_mut<T>(s: &mut [T]) -> &mut [T; PANEL] {
    s.first_chunk_mut().expect("a whole panel")
}

/// Stores gate, up and SiLU(gate)·up (bf16) for 16 columns.
pub(crate) fn swiglu_fwd(
    isa: Isa,
    gate: &[f32],
    up: &[f32],
    g_out: &mut [u16],
    u_out: &mut [u16],
    a_out: &mut [u16],
) {
    let p = FwdPanel {
        gate: panel(gate),
        up: panel(up),
        g_out: panel_mut(g_out),
        u_out: panel_mut(u_out),
        a_out: panel_mut(a_out),
    };
    // SAFETY: `isa` was checked available by the caller's layer (`kernels::dispatch`);
    // every slice of `p` is a whole panel.
    unsafe { (KernelSet::of(isa).swiglu_fwd)(p) }
}

/// From `da` (gradient of SiLU(gate)·up, before the routing weight `w`) and the saved
/// bf16 gate and up, stores the gate and up gradients (bf16) for 16 columns.
pub(crate) fn swiglu_bwd(
    isa: Isa,
    w: f32,
    da: &[f32],
    g: &[u16],
    u: &[u16],
    dg_out: &mut [u16],
    du_out: &mut [u16],
) {
    let p = BwdPanel {
        w,
        da: panel(da),
        g: panel(g),
        u: panel(u),
        dg_out: panel_mut(dg_out),
        du_out: panel_mut(du_out),
    };
    // SAFETY: as in `swiglu_fwd`.
    unsafe { (KernelSet::of(isa).swiglu_bwd)(p) }
}

// The portable kernels compute a panel in locals and store it once: references inside a
// struct carry no no-alias guarantee, and writing through them in the loop made LLVM add
// run-time overlap checks and a scalar fallback.
impl FwdPanel<'_> {
    /// The portable forward, with `act(g, u)` = SiLU(g)·u.
    #[inline(always)]
    fn run(self, act: impl Fn(f32, f32) -> f32) {
        let (mut g, mut u, mut a) = ([0u16; PANEL], [0u16; PANEL], [0u16; PANEL]);
        for l in 0..PANEL {
            g[l] = bf16::from_f32(self.gate[l]);
            u[l] = bf16::from_f32(self.up[l]);
            a[l] = bf16::from_f32(act(self.gate[l], self.up[l]));
        }
        (*self.g_out, *self.u_out, *self.a_out) = (g, u, a);
    }
}

impl BwdPanel<'_> {
    /// The portable backward, with `grads(d, g, u)` = the gradients of g and u for the
    /// output gradient `d` = w·da.
    #[inline(always)]
    fn run(self, grads: impl Fn(f32, f32, f32) -> (f32, f32)) {
        let (mut dg, mut du) = ([0u16; PANEL], [0u16; PANEL]);
        for l in 0..PANEL {
            let (gv, uv) = (bf16::to_f32(self.g[l]), bf16::to_f32(self.u[l]));
            let (a, b) = grads(self.w * self.da[l], gv, uv);
            (dg[l], du[l]) = (bf16::from_f32(a), bf16::from_f32(b));
        }
        (*self.dg_out, *self.du_out) = (dg, du);
    }
}

/// `swiglu_fwd` with `f32::exp`: the reference (`Scalar`).
pub(super) fn swiglu_fwd_scalar(p: FwdPanel<'_>) {
    p.run(|g, u| g / (1.0 + (-g).exp()) * u);
}

/// `swiglu_bwd` with `f32::exp`: the reference (`Scalar`).
pub(super) fn swiglu_bwd_scalar(p: BwdPanel<'_>) {
    p.run(|d, gv, uv| {
        let sig = 1.0 / (1.0 + (-gv).exp());
        (d * uv * sig * (1.0 + gv * (1.0 - sig)), d * gv * sig)
    });
}

/// e^x for |x| ≤ 87 (clamped outside; 2^n stays a normal float), relative error ≈ 2e-7:
/// the same reduction and polynomial as the AVX-512 `exp_ps`, in plain Rust so it
/// vectorises at any width. `n` is rounded by adding 1.5·2²³, which also leaves it in
/// the low mantissa bits for building 2^n.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = (-n).mul_add(0.693_145_75, x);
    let r = (-n).mul_add(1.428_606_8e-6, r);
    let mut p = 1.0f32 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    let e = (t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(e as u32)
}

#[inline(always)]
fn sigmoid_poly(x: f32) -> f32 {
    1.0 / (1.0 + exp_poly(-x))
}

super::multiversion! {
    /// `swiglu_fwd` with [`exp_poly`].
    mod swiglu_fwd_poly(p: FwdPanel<'_>) {
        p.run(|g, u| g * sigmoid_poly(g) * u);
    }
}

super::multiversion! {
    /// `swiglu_bwd` with [`exp_poly`].
    mod swiglu_bwd_poly(p: BwdPanel<'_>) {
        p.run(|d, gv, uv| {
            let sig = sigmoid_poly(gv);
            // d/dg SiLU(g) = σ(g)·(1 + g·(1 − σ(g)))
            (d * uv * (sig * gv.mul_add(1.0 - sig, 1.0)), d * (gv * sig))
        });
    }
}

pub(super) mod avx512 {
    use super::{BwdPanel, FwdPanel, PANEL};
    use std::arch::x86_64::*;

    /// e^x for |x| ≤ 88 (clamped outside), relative error ≈ 2e-7.
    #[inline(always)]
    unsafe fn exp_ps(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.0)),
            _mm512_set1_ps(-88.0),
        );
        let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[inline(always)]
    unsafe fn sigmoid(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(
            one,
            _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))),
        )
    }

    #[inline(always)]
    unsafe fn load_bf16(p: &[u16; PANEL]) -> __m512 {
        let v = _mm256_loadu_si256(p.as_ptr() as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    #[inline(always)]
    unsafe fn store_bf16(p: &mut [u16; PANEL], v: __m512) {
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(p.as_mut_ptr() as *mut __m256i, b);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(in crate::kernels) unsafe fn swiglu_fwd(p: FwdPanel<'_>) {
        let g = _mm512_loadu_ps(p.gate.as_ptr());
        let u = _mm512_loadu_ps(p.up.as_ptr());
        store_bf16(p.g_out, g);
        store_bf16(p.u_out, u);
        store_bf16(p.a_out, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u));
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(in crate::kernels) unsafe fn swiglu_bwd(p: BwdPanel<'_>) {
        let gv = load_bf16(p.g);
        let uv = load_bf16(p.u);
        let d = _mm512_mul_ps(_mm512_set1_ps(p.w), _mm512_loadu_ps(p.da.as_ptr()));
        let sig = sigmoid(gv);
        let one = _mm512_set1_ps(1.0);
        // d/dg SiLU(g) = σ(g)·(1 + g·(1 − σ(g)))
        let dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sig), one));
        store_bf16(p.dg_out, _mm512_mul_ps(_mm512_mul_ps(d, uv), dsilu));
        store_bf16(p.du_out, _mm512_mul_ps(d, _mm512_mul_ps(gv, sig)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epilogues_agree_across_isas() {
        let gate: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 1.9).collect(); // -14 .. 14
        let up: Vec<f32> = (0..16).map(|i| 0.3 - i as f32 * 0.07).collect();
        let da: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut want = [[0u16; 16]; 5];
        let [g0, u0, a0, dg0, du0] = &mut want;
        swiglu_fwd(Isa::Scalar, &gate, &up, g0, u0, a0);
        swiglu_bwd(Isa::Scalar, 0.7, &da, g0, u0, dg0, du0);
        for isa in Isa::available() {
            let mut got = [[0u16; 16]; 5];
            let [g, u, a, dg, du] = &mut got;
            swiglu_fwd(isa, &gate, &up, g, u, a);
            swiglu_bwd(isa, 0.7, &da, g, u, dg, du);
            for (x, y) in got.iter().flatten().zip(want.iter().flatten()) {
                let (x, y) = (bf16::to_f32(*x), bf16::to_f32(*y));
                assert!((x - y).abs() <= 1e-2 * y.abs() + 1e-6, "{isa}: {x} vs {y}");
            }
        }
        // Extreme inputs stay finite.
        let big = [
            90.0f32, -90.0, 1e4, -1e4, 0.0, 1e-30, -1e-30, 20.0, -20.0, 3.0, -3.0, 0.5, -0.5, 88.5,
            -88.5, 44.0,
        ];
        for isa in Isa::available() {
            let mut o = [[0u16; 16]; 3];
            let [g, u, a] = &mut o;
            swiglu_fwd(isa, &big, &[1.0; 16], g, u, a);
            assert!(a.iter().all(|v| bf16::to_f32(*v).is_finite()), "{isa}");
        }
    }
}
