"""A loss curve as a PNG without plotting libraries (zlib + struct)."""

from __future__ import annotations

import struct
import zlib
from typing import List


def _png(width: int, height: int, rows: List[bytearray]) -> bytes:
    raw = b"".join(b"\x00" + bytes(r) for r in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def loss_curve_png(losses: List[float], path: str, width: int = 640, height: int = 320) -> None:
    """White background, grey axes, the loss as a blue polyline (min..max scaled)."""
    rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    m = 30

    def put(x: int, y: int, rgb) -> None:
        if 0 <= x < width and 0 <= y < height:
            rows[y][3 * x : 3 * x + 3] = bytes(rgb)

    for x in range(m, width - 10):
        put(x, height - m, (120, 120, 120))
    for y in range(10, height - m + 1):
        put(m, y, (120, 120, 120))
    if len(losses) >= 2:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        pts = [(m + round(i * (width - m - 11) / (len(losses) - 1)), 10 + round((hi - v) / span * (height - m - 10))) for i, v in enumerate(losses)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for k in range(n + 1):
                x, y = x0 + (x1 - x0) * k // n, y0 + (y1 - y0) * k // n
                for dy in (0, 1):
                    put(x, y + dy, (30, 90, 200))
    with open(path, "wb") as f:
        f.write(_png(width, height, rows))
