//! The weight layout every GEMM kernel reads: "VNNI panels".
//!
//! A weight W [n, k] (n outputs, k inputs; `y = x · Wᵀ`) is stored as panels of 16
//! outputs. Inside a panel, input pairs follow each other; one pair row is 16 u32 =
//! 64 bytes holding `(W[16p+l, 2j], W[16p+l, 2j+1])` for l = 0..16:
//!
//! ```text
//! data[((p * k_pad/2 + j) * 16 + l) * 2 + b] = W[16p + l, 2j + b]
//! ```
//!
//! That is the operand of `vdpbf16ps` (broadcast an activation pair, multiply 16 lanes)
//! and, 16 pair rows at a time, exactly an AMX-BF16 B tile (16 rows × 64 bytes, K = 32),
//! so one packing serves both ISAs. n and k are padded to multiples of 32 with zeros, so
//! kernels never see ragged edges: activations are gathered into zero-padded rows too.
//!
//! The fused gate+up matrix interleaves panels (gate panel q, up panel q, gate q+1, …) so
//! a kernel producing 32 adjacent columns holds matching gate and up values for the
//! SiLU(gate)·up epilogue.

use crate::buffer::Buffer;
use crate::error::{KtrsError, Result};

/// Outputs per panel (one zmm of f32, one AMX C tile width).
pub const PANEL: usize = 16;
/// Padding granularity of n and k (one AMX tile depth in bf16).
pub const PAD: usize = 32;

pub fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Shape of one packed matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackShape {
    /// Real outputs.
    pub n: usize,
    /// Real inputs.
    pub k: usize,
    pub n_pad: usize,
    pub k_pad: usize,
}

impl PackShape {
    pub fn new(n: usize, k: usize) -> PackShape {
        PackShape {
            n,
            k,
            n_pad: round_up(n.max(1), PAD),
            k_pad: round_up(k.max(1), PAD),
        }
    }
    pub fn panels(&self) -> usize {
        self.n_pad / PANEL
    }
    /// u16 elements per panel.
    pub fn panel_len(&self) -> usize {
        self.k_pad * PANEL
    }
    /// u16 elements of the whole packed matrix.
    pub fn len(&self) -> usize {
        self.n_pad * self.k_pad
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline]
    pub fn index(&self, row: usize, col: usize) -> usize {
        ((row / PANEL * (self.k_pad / 2) + col / 2) * PANEL + row % PANEL) * 2 + col % 2
    }
}

/// Packs `w` ([n, k] row-major bf16 bits) into `dst` (len `shape.len()`, zeroed padding).
pub fn pack_into(w: &[u16], shape: PackShape, dst: &mut [u16]) {
    debug_assert_eq!(w.len(), shape.n * shape.k);
    debug_assert_eq!(dst.len(), shape.len());
    dst.fill(0);
    for r in 0..shape.n {
        pack_row(&w[r * shape.k..(r + 1) * shape.k], shape, r, dst);
    }
}

/// Writes one row (`row.len() == shape.k`) of the matrix into its packed place.
pub fn pack_row(row: &[u16], shape: PackShape, r: usize, dst: &mut [u16]) {
    debug_assert!(r < shape.n_pad && row.len() <= shape.k_pad);
    let base = (r / PANEL * (shape.k_pad / 2)) * PANEL * 2 + (r % PANEL) * 2;
    for (j, pair) in row.chunks(2).enumerate() {
        let at = base + j * PANEL * 2;
        dst[at] = pair[0];
        if pair.len() == 2 {
            dst[at + 1] = pair[1];
        }
    }
}

/// Packs one panel from its 16 source rows (each `k` long; `None`: a padding row) into
/// `dst` (`k_pad * PANEL` u16), padding included: the layout [`pack_row`] writes row by
/// row, but produced pair row by pair row, so the stores stream instead of striding 64
/// bytes apart (loading a model is bound by this loop).
pub fn pack_panel_rows(rows: &[Option<&[u16]>; PANEL], k: usize, dst: &mut [u16]) {
    debug_assert!(dst.len().is_multiple_of(2 * PANEL) && dst.len() / PANEL >= k);
    static ZEROS: [u16; 2] = [0; 2];
    let full = k / 2;
    assert!(dst.len() >= full * 2 * PANEL && rows.iter().flatten().all(|r| r.len() >= k));
    // A padding row reads the same zero pair at every j (stride 0).
    let src: [(*const u16, usize); PANEL] = std::array::from_fn(|l| match rows[l] {
        Some(r) => (r.as_ptr(), 2),
        None => (ZEROS.as_ptr(), 0),
    });
    let base = dst.as_mut_ptr();
    for j in 0..full {
        for (l, &(p, step)) in src.iter().enumerate() {
            // SAFETY: j < k/2 and every row holds k elements (asserted), so the pair at
            // 2j is in bounds (the zero row is read at offset 0); dst holds `full` pair
            // rows of 2·PANEL u16. Unaligned u32 accesses copy the (even, odd) pair at once.
            unsafe {
                let pair = (p.add(j * step) as *const u32).read_unaligned();
                (base.add((j * PANEL + l) * 2) as *mut u32).write_unaligned(pair);
            }
        }
    }
    let mut out = dst.chunks_exact_mut(2 * PANEL).skip(full);
    if k % 2 == 1 {
        if let Some(o) = out.next() {
            for (l, row) in rows.iter().enumerate() {
                o[2 * l] = row.map_or(0, |r| r[k - 1]);
                o[2 * l + 1] = 0;
            }
        }
    }
    for o in out {
        o.fill(0);
    }
}

/// Inverse of [`pack_into`].
pub fn unpack(src: &[u16], shape: PackShape) -> Vec<u16> {
    let mut w = vec![0u16; shape.n * shape.k];
    for r in 0..shape.n {
        for c in 0..shape.k {
            w[r * shape.k + c] = src[shape.index(r, c)];
        }
    }
    w
}

/// Row of the fused gate+up matrix that holds gate row `i` (`up = false`) or up row `i`.
#[inline]
pub fn fused_row(i: usize, up: bool) -> usize {
    (i / PANEL) * 2 * PANEL + usize::from(up) * PANEL + i % PANEL
}

/// Packs the transposed block of `src` needed to multiply by W instead of Wᵀ:
/// for input columns `c0 .. c0 + 16·np` of `src` (the new outputs), with all of src's
/// padded outputs as the new inputs. `dst` gets `np` panels of `src.n_pad * 16` u16.
///
/// Reading 64-byte pair rows of the forward layout keeps this at memory speed, and the
/// block is small enough to stay in L2 while the kernel reuses it for every token row.
pub fn pack_transposed_block(src: &[u16], shape: PackShape, c0: usize, np: usize, dst: &mut [u16]) {
    let t_k = shape.n_pad; // new contraction length (multiple of 32)
    debug_assert_eq!(dst.len(), np * PANEL * t_k);
    debug_assert!(c0.is_multiple_of(PANEL) && c0 + np * PANEL <= shape.k_pad);
    let kp2 = shape.k_pad / 2;
    for q in 0..np {
        let dpanel = &mut dst[q * PANEL * t_k..(q + 1) * PANEL * t_k];
        let col_base = c0 + q * PANEL;
        // Source pair rows j covering columns col_base..col_base+16.
        for p in 0..shape.panels() {
            for jj in 0..PANEL / 2 {
                let j = col_base / 2 + jj;
                let srow = &src[((p * kp2 + j) * PANEL) * 2..((p * kp2 + j) * PANEL + PANEL) * 2];
                // srow[l*2+b] = W[16p+l, 2j+b]; new element (out c = 2j+b, in r = 16p+l)
                for l in 0..PANEL {
                    let r = p * PANEL + l;
                    for b in 0..2 {
                        let c_local = jj * 2 + b; // 0..16 inside the new panel
                        dpanel[((r / 2) * PANEL + c_local) * 2 + r % 2] = srow[l * 2 + b];
                    }
                }
            }
        }
    }
}

/// The packed weights of all experts of one projection, back to back.
pub struct ExpertPack {
    pub shape: PackShape,
    pub experts: usize,
    data: Buffer<u16>,
}

impl ExpertPack {
    pub fn zeroed(experts: usize, shape: PackShape) -> ExpertPack {
        ExpertPack {
            shape,
            experts,
            data: Buffer::zeroed(experts * shape.len()),
        }
    }

    pub fn expert(&self, e: usize) -> &[u16] {
        let l = self.shape.len();
        &self.data.as_slice()[e * l..(e + 1) * l]
    }

    pub fn expert_mut(&mut self, e: usize) -> &mut [u16] {
        let l = self.shape.len();
        &mut self.data.as_mut_slice()[e * l..(e + 1) * l]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// All experts' panels, back to back (`experts * shape.len()` u16).
    pub fn as_slice(&self) -> &[u16] {
        self.data.as_slice()
    }

    pub fn check_expert(&self, e: usize) -> Result<()> {
        if e >= self.experts {
            return Err(KtrsError::invalid(
                "expert",
                format!("an index below {}", self.experts),
                e,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u16 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 48) as u16
    }

    #[test]
    fn pack_panel_rows_matches_pack_row() {
        for (n, k) in [(16, 64), (13, 7), (5, 1), (16, 33), (3, 30)] {
            let shape = PackShape::new(n, k);
            let w: Vec<u16> = (0..n * k).map(|x| (x * 7 + 1) as u16).collect();
            let one = PackShape {
                n: PANEL,
                n_pad: PANEL,
                ..shape
            };
            let mut want = vec![0u16; shape.panel_len()];
            for r in 0..n.min(PANEL) {
                pack_row(&w[r * k..(r + 1) * k], one, r, &mut want);
            }
            let rows: [Option<&[u16]>; PANEL] =
                std::array::from_fn(|r| (r < n).then(|| &w[r * k..(r + 1) * k]));
            let mut got = vec![0xffffu16; shape.panel_len()];
            pack_panel_rows(&rows, k, &mut got);
            assert_eq!(got, want, "n={n} k={k}");
        }
    }

    #[test]
    fn pack_unpack_round_trip() {
        let mut s = 1u64;
        for (n, k) in [(1, 1), (16, 32), (17, 33), (2050, 7), (45, 1407)] {
            let w: Vec<u16> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sh = PackShape::new(n, k);
            let mut d = vec![7u16; sh.len()];
            pack_into(&w, sh, &mut d);
            assert_eq!(unpack(&d, sh), w);
            // Padding is zero.
            let nz = d.iter().filter(|&&v| v != 0).count();
            assert!(nz <= n * k);
        }
    }

    #[test]
    fn transposed_block_matches_transposed_pack() {
        let mut s = 5u64;
        for (n, k) in [(32, 32), (40, 70), (96, 64)] {
            let w: Vec<u16> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sh = PackShape::new(n, k);
            let mut f = vec![0u16; sh.len()];
            pack_into(&w, sh, &mut f);
            // Reference: pack Wᵀ [k, n] directly, with n padded like the forward pack.
            let mut wt = vec![0u16; k * sh.n_pad];
            for r in 0..n {
                for c in 0..k {
                    wt[c * sh.n_pad + r] = w[r * k + c];
                }
            }
            let tsh = PackShape::new(k, sh.n_pad);
            let mut t = vec![0u16; tsh.len()];
            pack_into(&wt, tsh, &mut t);
            let np = 2;
            for c0 in (0..sh.k_pad).step_by(np * PANEL) {
                let mut blk = vec![0u16; np * PANEL * sh.n_pad];
                pack_transposed_block(&f, sh, c0, np, &mut blk);
                let off = (c0 / PANEL) * tsh.panel_len();
                assert_eq!(&blk[..], &t[off..off + np * tsh.panel_len()]);
            }
        }
    }

    #[test]
    fn fused_rows_interleave_panels() {
        assert_eq!(fused_row(0, false), 0);
        assert_eq!(fused_row(0, true), 16);
        assert_eq!(fused_row(15, true), 31);
        assert_eq!(fused_row(16, false), 32);
    }
}
