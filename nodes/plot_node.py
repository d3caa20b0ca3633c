"""The loss plot: training metrics drawn as an image (PIL only, no plotting library needed).

Top panel: the DPO loss per step (faint) and its moving average (bold), optionally on a log scale.
Bottom panel (when the metrics have it): the implicit accuracy (share of pairs where the expert prefers the
safe image more than the reference does) and the reward margin, both smoothed.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Sequence

from ._core import errors
from .common import BOOL, INT, SOCKET, Node, pil_to_image
from .types import METRICS

BG, AXIS, GRID, TEXT = (255, 255, 255), (60, 60, 60), (225, 225, 225), (30, 30, 30)
RAW, SMOOTH, ACC, MARGIN = (170, 190, 230), (25, 70, 170), (20, 140, 60), (200, 110, 20)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (window 1 = the values themselves); NaNs are skipped."""
    out, buf = [], []
    for v in values:
        buf.append(v)
        if len(buf) > max(1, window):
            buf.pop(0)
        finite = [x for x in buf if math.isfinite(x)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _panel(draw, font, box, xs, series, title, log_scale=False):
    """One panel: ``series`` is a list of (values, colour, width); x from ``xs``."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=AXIS)
    vals = [v for values, _, _ in series for v in values if math.isfinite(v) and (v > 0 or not log_scale)]
    draw.text((x0 + 4, y0 - 14), title, fill=TEXT, font=font)
    if not vals or not xs:
        draw.text((x0 + 8, y0 + 8), "no data", fill=TEXT, font=font)
        return
    tf = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    lo, hi = tf(min(vals)), tf(max(vals))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xmin, xmax = min(xs), max(xs)
    xspan = max(1e-12, xmax - xmin)

    def px(x, v):
        return (x0 + (x - xmin) / xspan * (x1 - x0), y1 - (tf(v) - lo) / (hi - lo) * (y1 - y0))

    for i in range(1, 4):  # grid lines and their values
        yy = y0 + i * (y1 - y0) / 4
        draw.line([(x0, yy), (x1, yy)], fill=GRID)
        val = hi - i * (hi - lo) / 4
        draw.text((x0 - 52, yy - 6), _fmt(10 ** val if log_scale else val), fill=TEXT, font=font)
    draw.text((x0 - 52, y0 - 2), _fmt(10 ** hi if log_scale else hi), fill=TEXT, font=font)
    draw.text((x0 - 52, y1 - 10), _fmt(10 ** lo if log_scale else lo), fill=TEXT, font=font)
    for values, colour, width in series:
        pts = [px(x, v) for x, v in zip(xs, values) if math.isfinite(v) and (v > 0 or not log_scale)]
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=width)


def draw_plot(history: Sequence[dict], smoothing: int = 10, log_scale: bool = False, width: int = 768,
              height: int = 432, title: str = "Diffusion-DPO training"):
    """A PIL RGB image of the metrics ``history`` (rows with ``step``, ``loss``, optional ``implicit_acc``,
    ``margin``)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (int(width), int(height)), BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    rows = [r for r in history if "loss" in r]
    xs = [float(r.get("step", i + 1)) for i, r in enumerate(rows)]
    loss = [float(r["loss"]) for r in rows]
    has_acc = any("implicit_acc" in r for r in rows)
    left, right, top = 60, int(width) - 12, 34
    bottom = int(height) - 24
    split = top + (bottom - top) * (0.58 if has_acc else 1.0)
    last = f" - step {int(xs[-1])}, loss {_fmt(loss[-1])}" if rows else ""
    draw.text((left, 4), title + last, fill=TEXT, font=font)
    log_ok = log_scale and any(v > 0 for v in loss)
    _panel(draw, font, (left, top, right, int(split) - (18 if has_acc else 0)), xs,
           [(loss, RAW, 1), (moving_average(loss, smoothing), SMOOTH, 2)],
           f"loss (moving average over {max(1, smoothing)} steps{', log scale' if log_ok else ''})", log_ok)
    if has_acc:
        acc = moving_average([float(r.get("implicit_acc", float("nan"))) for r in rows], smoothing)
        series = [(acc, ACC, 2)]
        label = "implicit accuracy (green)"
        if any("margin" in r for r in rows):
            margin = moving_average([float(r.get("margin", float("nan"))) for r in rows], smoothing)
            finite = [abs(v) for v in margin if math.isfinite(v)]
            scale = max(finite) if finite and max(finite) > 0 else 1.0
            series.append(([v / scale * 0.5 + 0.5 if math.isfinite(v) else v for v in margin], MARGIN, 1))
            label += f", reward margin scaled to 0..1 around 0.5 (orange, |max| {_fmt(scale)})"
        _panel(draw, font, (left, int(split) + 16, right, bottom), xs, series, label)
    draw.text((left, int(height) - 14), f"steps {int(xs[0]) if xs else 0} .. {int(xs[-1]) if xs else 0}",
              fill=TEXT, font=font)
    return img


class LossPlot(Node):
    DESCRIPTION = ("Draws the training metrics of the train node as an image: the DPO loss with a moving average "
                   "(optionally log scale), and the implicit accuracy and reward margin. Shows on the node and "
                   "outputs the IMAGE.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The plot as an IMAGE.",)
    FUNCTION = "plot"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "metrics": SOCKET(METRICS, "Training metrics from the train node."),
            "smoothing": INT(10, 1, 10000, "Moving-average window in steps (1 = none)."),
            "log_scale": BOOL(False, "Draw the loss on a log scale."),
            "width": INT(768, 256, 4096, "Image width in pixels.", step=8),
            "height": INT(432, 160, 4096, "Image height in pixels.", step=8),
        }}

    def plot(self, metrics, smoothing, log_scale, width, height):
        if not isinstance(metrics, dict) or not isinstance(metrics.get("history"), list):
            raise errors().ConfigError("metrics: expected SAFETYDPO_METRICS from the train node.")
        cat = metrics.get("category")
        img = draw_plot(metrics["history"], int(smoothing), bool(log_scale), int(width), int(height),
                        title=f"Diffusion-DPO expert ({cat})" if cat else "Diffusion-DPO training")
        ui = []
        try:
            import folder_paths

            name = f"safetydpo_loss_{uuid.uuid4().hex[:12]}.png"
            temp = folder_paths.get_temp_directory()
            os.makedirs(temp, exist_ok=True)
            img.save(os.path.join(temp, name))
            ui = [{"filename": name, "subfolder": "", "type": "temp"}]
        except (ImportError, OSError):
            pass
        return {"ui": {"images": ui}, "result": (pil_to_image([img]),)}
