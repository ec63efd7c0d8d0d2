"""A loss curve as a PNG without plotting libraries (zlib + struct and a 5x7 pixel font):
title, labelled axes with ticks, log-scale loss, the raw loss and a smoothed curve."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

_GLYPHS: Dict[str, Tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    "-": ("00000", "00000", "00000", "11111", "00000", "00000", "00000"),
    "+": ("00000", "00100", "00100", "11111", "00100", "00100", "00000"),
    "(": ("00010", "00100", "01000", "01000", "01000", "00100", "00010"),
    ")": ("01000", "00100", "00010", "00010", "00010", "00100", "01000"),
    "a": ("00000", "00000", "01110", "00001", "01111", "10001", "01111"),
    "c": ("00000", "00000", "01110", "10000", "10000", "10001", "01110"),
    "d": ("00001", "00001", "01101", "10011", "10001", "10001", "01111"),
    "e": ("00000", "00000", "01110", "10001", "11111", "10000", "01110"),
    "g": ("00000", "00000", "01111", "10001", "01111", "00001", "01110"),
    "h": ("10000", "10000", "10110", "11001", "10001", "10001", "10001"),
    "i": ("00100", "00000", "01100", "00100", "00100", "00100", "01110"),
    "l": ("01100", "00100", "00100", "00100", "00100", "00100", "01110"),
    "m": ("00000", "00000", "11010", "10101", "10101", "10001", "10001"),
    "n": ("00000", "00000", "10110", "11001", "10001", "10001", "10001"),
    "o": ("00000", "00000", "01110", "10001", "10001", "10001", "01110"),
    "p": ("00000", "00000", "11110", "10001", "11110", "10000", "10000"),
    "r": ("00000", "00000", "10110", "11001", "10000", "10000", "10000"),
    "s": ("00000", "00000", "01110", "10000", "01110", "00001", "11110"),
    "t": ("01000", "01000", "11100", "01000", "01000", "01001", "00110"),
    "w": ("00000", "00000", "10001", "10001", "10101", "10101", "01010"),
    "x": ("00000", "00000", "10001", "01010", "00100", "01010", "10001"),
    " ": ("00000",) * 7,
}

INK = (40, 40, 40)
AXIS = (120, 120, 120)
GRID = (228, 228, 228)
RAW = (160, 190, 235)
SMOOTH = (20, 70, 180)


def _png(width: int, height: int, rows: List[bytearray]) -> bytes:
    raw = b"".join(b"\x00" + bytes(r) for r in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x : 3 * x + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb, thick: int = 1) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            x, y = x0 + (x1 - x0) * k // n, y0 + (y1 - y0) * k // n
            for d in range(thick):
                self.put(x, y + d, rgb)

    def text(self, x: int, y: int, s: str, rgb=INK, scale: int = 1) -> None:
        """Draws `s` with its top-left corner at (x, y)."""
        for i, ch in enumerate(s):
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for r, bits in enumerate(glyph):
                for c, bit in enumerate(bits):
                    if bit == "1":
                        for dy in range(scale):
                            for dx in range(scale):
                                self.put(x + (6 * i + c) * scale + dx, y + r * scale + dy, rgb)

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return 6 * len(s) * scale - scale


def smooth(values: Sequence[float], span: int) -> List[float]:
    """Centred moving average of the logs over `span` points (shorter at the ends): on a
    log axis it follows the curve without the lag of a trailing average."""
    logs = [math.log(max(v, 1e-30)) for v in values]
    h = max(span // 2, 0)
    out = []
    for i in range(len(logs)):
        w = logs[max(0, i - h) : i + h + 1]
        out.append(math.exp(sum(w) / len(w)))
    return out


def _nice_step(span: float, max_ticks: int) -> float:
    raw = span / max(max_ticks, 1)
    p = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next((p * m for m in (1, 2, 5, 10) if p * m >= raw), 10 * p)


def log_ticks(lo: float, hi: float) -> List[float]:
    """Tick values for a log axis over [lo, hi]: decades, plus 2 and 5 when few decades."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if k1 - k0 > 3 else (1, 2, 5)
    ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mults if lo <= m * 10.0**k <= hi]
    return ticks or [lo, hi]


def layout(losses: Sequence[float], width: int = 720, height: int = 400):
    """Plot geometry: (plot box (x0, y0, x1, y1), x(step), y(loss), y range (lo, hi))."""
    x0, y0, x1, y1 = 72, 44, width - 24, height - 52
    finite = [v for v in losses if math.isfinite(v) and v > 0] or [1.0]
    lo, hi = min(finite), max(finite)
    if hi / lo < 1.5:  # a nearly flat curve still gets a readable range
        lo, hi = lo / 1.25, hi * 1.25
    n = max(len(losses) - 1, 1)

    def px(i: float) -> int:
        return x0 + round(i * (x1 - x0) / n)

    def py(v: float) -> int:
        v = min(max(v, lo), hi)
        return y1 - round((math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) * (y1 - y0))

    return (x0, y0, x1, y1), px, py, (lo, hi)


def loss_curve_png(losses: List[float], path: str, width: int = 720, height: int = 400, title: str = "training loss") -> None:
    """The loss per step on a log scale (light) with a smoothed curve (dark)."""
    cv = _Canvas(width, height)
    (x0, y0, x1, y1), px, py, (lo, hi) = layout(losses, width, height)
    full = f"{title} (log scale)"
    cv.text((width - cv.text_width(full, 2)) // 2, 10, full, scale=2)
    for v in log_ticks(lo, hi):
        y = py(v)
        cv.line(x0, y, x1, y, GRID)
        cv.line(x0 - 4, y, x0, y, AXIS)
        label = f"{v:g}"
        cv.text(x0 - 7 - cv.text_width(label), y - 3, label)
    steps = max(len(losses), 1)
    step = _nice_step(steps, 8)
    s = 0.0
    while s <= steps:
        x = px(max(s - 1, 0))  # step s is index s - 1 (steps count from 1)
        cv.line(x, y1, x, y1 + 4, AXIS)
        label = f"{int(s) if s else 1}"
        cv.text(x - cv.text_width(label) // 2, y1 + 8, label)
        s += step
    cv.line(x0, y1, x1, y1, AXIS)
    cv.line(x0, y0, x0, y1, AXIS)
    cv.text((x0 + x1 - cv.text_width("step")) // 2, y1 + 24, "step")
    cv.text(x0 - 60, y0 - 14, "loss")
    pts = [(px(i), py(v)) for i, v in enumerate(losses) if math.isfinite(v)]
    for (a, b), (c, d) in zip(pts, pts[1:]):
        cv.line(a, b, c, d, RAW)
    finite = [v if math.isfinite(v) else hi for v in losses]
    sm = smooth(finite, max(3, len(losses) // 15))
    spts = [(px(i), py(v)) for i, v in enumerate(sm)]
    for (a, b), (c, d) in zip(spts, spts[1:]):
        cv.line(a, b, c, d, SMOOTH, thick=2)
    # legend, top right
    lx = x1 - cv.text_width("smoothed") - 30
    cv.line(lx, y0 + 6, lx + 20, y0 + 6, RAW)
    cv.text(lx + 26, y0 + 3, "raw")
    cv.line(lx, y0 + 18, lx + 20, y0 + 18, SMOOTH, thick=2)
    cv.text(lx + 26, y0 + 15, "smoothed")
    with open(path, "wb") as f:
        f.write(_png(width, height, cv.rows))
