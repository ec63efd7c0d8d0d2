//! Packing HF-layout expert weights into a layer's VNNI panels. `MoeLayer::new`,
//! `set_expert` and the loaders (`crate::load`) all pack through here, so every path
//! writes the same bytes.

use super::{ExpertWeights, MoeLayer};
use crate::buffer::SendPtr;
use crate::pack::{self, PackShape, PANEL};
use crate::pool::ThreadPool;
use std::ops::Range;

/// Packs one expert into `g` (fused gate+up) and `d` (down), panel by panel.
pub(super) fn pack_expert(
    gs: PackShape,
    ds: PackShape,
    h: usize,
    i: usize,
    src: &ExpertWeights<'_>,
    g: &mut [u16],
    d: &mut [u16],
) {
    let panels = g
        .chunks_mut(gs.panel_len())
        .chain(d.chunks_mut(ds.panel_len()));
    for (t, panel) in panels.enumerate() {
        pack_panel(gs, ds, h, i, src.of(panel_source(gs, t).0), 0, t, panel);
    }
}

/// One of an expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

impl ExpertWeights<'_> {
    pub(super) fn of(&self, p: Proj) -> &[u16] {
        match p {
            Proj::Gate => self.gate,
            Proj::Up => self.up,
            Proj::Down => self.down,
        }
    }
}

/// The projection panel `t` of an expert is packed from, and its first row there. A
/// fused gate+up panel holds 16 rows of one projection (`fused_row`: gate panel q, up
/// panel q, gate q+1, ...), so each projection can be packed on its own.
pub(super) fn panel_source(gs: PackShape, t: usize) -> (Proj, usize) {
    if t < gs.panels() {
        let p = if t.is_multiple_of(2) {
            Proj::Gate
        } else {
            Proj::Up
        };
        (p, t / 2 * PANEL)
    } else {
        (Proj::Down, (t - gs.panels()) * PANEL)
    }
}

/// Packs panel `t` of one expert (`t < gs.panels()`: a fused gate+up panel, else down
/// panel `t - gs.panels()`) into `panel` from `w`, the projection [`panel_source`] names
/// (gate, up `[i, h]`, down `[h, i]`) from row `first` on, padding with zeros. Panels
/// are disjoint, so they can be packed in parallel.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_panel(
    gs: PackShape,
    ds: PackShape,
    h: usize,
    i: usize,
    w: &[u16],
    first: usize,
    t: usize,
    panel: &mut [u16],
) {
    let (proj, r0) = panel_source(gs, t);
    let (rows, k, shape) = if proj == Proj::Down {
        (h, i, ds)
    } else {
        (i, h, gs)
    };
    let src: [Option<&[u16]>; PANEL] = std::array::from_fn(|l| {
        let r = r0 + l - first;
        (r0 + l < rows).then(|| &w[r * k..(r + 1) * k])
    });
    pack::pack_panel_rows(&src, shape.k, panel);
}

/// A layer's packed weights as the target of loaders that pack many (expert,
/// projection) pairs at once on the layer's pool (`crate::load`). Borrows the layer
/// mutably, so nothing else reads or writes the packs meanwhile.
pub(crate) struct PackTarget<'a> {
    gs: PackShape,
    ds: PackShape,
    h: usize,
    i: usize,
    experts: usize,
    gate_up: SendPtr<u16>,
    down: SendPtr<u16>,
    pub(crate) pool: &'a ThreadPool,
}

impl MoeLayer {
    /// The target for loading `experts`, whose transposed blocks are dropped (they are
    /// stale once repacked).
    pub(crate) fn pack_target(&mut self, experts: impl Iterator<Item = usize>) -> PackTarget<'_> {
        for e in experts {
            self.t_gate_up.clear_expert(e);
            self.t_down.clear_expert(e);
        }
        PackTarget {
            gs: self.gate_up.shape,
            ds: self.down.shape,
            h: self.config.hidden,
            i: self.config.intermediate,
            experts: self.config.experts,
            gate_up: SendPtr(self.gate_up.expert_mut(0).as_mut_ptr()),
            down: SendPtr(self.down.expert_mut(0).as_mut_ptr()),
            pool: &self.pool,
        }
    }
}

impl PackTarget<'_> {
    /// `[rows, columns]` of projection `p` in HF layout.
    pub(crate) fn shape(&self, p: Proj) -> [usize; 2] {
        match p {
            Proj::Down => [self.h, self.i],
            _ => [self.i, self.h],
        }
    }

    /// Packs rows `rows` of projection `p` of expert `e` from `w` (`[rows.len(), k]`, bf16
    /// bits): the panels `set_expert` would write for them, so the bytes are the same.
    /// A panel is 16 rows, so `rows` starts at a multiple of 16 and ends at one or at the
    /// projection's end (which also writes the all-padding panels after it).
    ///
    /// # Safety
    /// No other thread touches projection `p` of expert `e` while this runs.
    pub(crate) unsafe fn pack_rows(&self, e: usize, p: Proj, rows: Range<usize>, w: &[u16]) {
        let [n, k] = self.shape(p);
        assert!(
            e < self.experts
                && w.len() == rows.len() * k
                && rows.start.is_multiple_of(PANEL)
                && (rows.end.is_multiple_of(PANEL) && rows.end <= n || rows.end == n),
            "packing rows {rows:?} of {p:?} of expert {e}"
        );
        let (gs, ds) = (self.gs, self.ds);
        let (first, step, count) = match p {
            Proj::Gate => (0, 2, gs.panels() / 2),
            Proj::Up => (1, 2, gs.panels() / 2),
            Proj::Down => (gs.panels(), 1, ds.panels()),
        };
        let end = if rows.end == n {
            count
        } else {
            rows.end / PANEL
        };
        let panels = (first..).step_by(step).take(end).skip(rows.start / PANEL);
        for t in panels {
            let panel = if t < gs.panels() {
                self.gate_up
                    .slice_mut(e * gs.len() + t * gs.panel_len(), gs.panel_len())
            } else {
                let p = t - gs.panels();
                self.down
                    .slice_mut(e * ds.len() + p * ds.panel_len(), ds.panel_len())
            };
            pack_panel(gs, ds, self.h, self.i, w, rows.start, t, panel);
        }
    }
}
