"""The loss-curve PNG: decodable, with a title, labelled axes and ticks, a log-scale
loss axis, the raw loss and a smoothed curve."""

import math
import struct
import zlib

from ktrs.app import plot


def read_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = zlib.decompress(idat)
    rows = [raw[r * (3 * w + 1) + 1 : (r + 1) * (3 * w + 1)] for r in range(h)]
    return w, h, lambda x, y: tuple(rows[y][3 * x : 3 * x + 3])


def inked(px, xs, ys):
    return sum(px(x, y) != (255, 255, 255) for x in xs for y in ys)


def test_loss_curve_has_title_axes_ticks_and_both_curves(tmp_path):
    losses = [4.0 * 0.97**i * (1.2 if i % 2 else 0.85) for i in range(120)]
    path = str(tmp_path / "c.png")
    plot.loss_curve_png(losses, path)
    w, h, px = read_png(path)
    (x0, y0, x1, y1), _, _, _ = plot.layout(losses, w, h)
    assert inked(px, range(w), range(0, y0 - 16)) > 100  # title
    assert inked(px, range(0, x0 - 6), range(y0, y1)) > 50  # loss tick labels
    assert inked(px, range(x0, x1), range(y1 + 6, h)) > 50  # step tick labels and "step"
    colours = {px(x, y) for x in range(x0, x1) for y in range(y0, y1)}
    assert plot.RAW in colours and plot.SMOOTH in colours


def test_loss_axis_is_logarithmic_and_smoothing_follows_the_trend():
    losses = [10.0 * 0.5 ** (i / 10) for i in range(60)]  # exponential decay
    _, px, py, _ = plot.layout(losses)
    ys = [py(v) for v in losses]
    # On a log axis an exponential decay is a straight line.
    slope = (ys[-1] - ys[0]) / (len(ys) - 1)
    assert all(abs(y - (ys[0] + slope * i)) <= 1 for i, y in enumerate(ys))
    noisy = [v * (1.5 if i % 2 else 1 / 1.5) for i, v in enumerate(losses)]
    sm = plot.smooth(noisy, 6)
    assert max(abs(math.log(a / b)) for a, b in zip(sm[5:-5], losses[5:-5])) < 0.1
    assert plot.log_ticks(0.05, 5.0)[:3] == [0.05, 0.1, 0.2]


def test_flat_or_broken_losses_still_plot(tmp_path):
    for losses in ([1.0], [2.0, 2.0, 2.0], [3.0, float("nan"), 1.0, float("inf"), 0.5]):
        plot.loss_curve_png(losses, str(tmp_path / "x.png"))
        read_png(str(tmp_path / "x.png"))
