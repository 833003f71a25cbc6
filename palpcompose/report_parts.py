"""The self-contained pieces of out/report.html (palpcompose/report.py): inline SVG line plots, images as data: URIs,
the page's style sheet and its Content-Security-Policy. Nothing here reads out/ or knows about runs."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

MAX_EMBED_BYTES = 400_000  # a PNG/JPEG under the size limit in pixels and this size is embedded as it is


def finite(value) -> float | None:
    """A logged number as a float; None for a missing, non-numeric (a bool, a string) or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def svg_plot(title: str, note: str, series: list[tuple[str, str, list[tuple[int, float | None]]]],
             reference: float | None = None, width: int = 440, height: int = 210) -> str:
    """A line plot: one polyline per (label, colour, points); None values break the line. Long noisy series get a
    moving average drawn over the faint raw values. `reference` draws a dashed horizontal line (e.g. 1 for a ratio)."""
    left, right, top, bottom = 58, 12, 26, 30
    values = [v for _, _, pts in series for _, v in pts if v is not None]
    steps = [s for _, _, pts in series for s, v in pts if v is not None]
    head = (f'<figure class="plot"><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}">'
            f'<text x="{left}" y="16" class="t">{html.escape(title)}</text>')
    if not values:
        return head + f'<text x="{left}" y="{height // 2}">no values logged</text></svg></figure>'
    lo, hi = min(values), max(values)
    if reference is not None and lo <= reference * 4 and hi >= reference / 4:
        lo, hi = min(lo, reference), max(hi, reference)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    x0, x1 = min(steps), max(steps)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    pw, ph = width - left - right, height - top - bottom

    def px(step):
        return left + (step - x0) / (x1 - x0) * pw

    def py(value):
        return top + (hi - value) / (hi - lo) * ph

    parts = [head, f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for tick in _nice_ticks(lo, hi):
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" class="yl">{fmt(tick)}</text>')
    for tick in _nice_ticks(x0, x1, 6):
        if float(tick).is_integer():
            x = px(tick)
            parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" class="xl">{int(tick)}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 2}" class="xl" text-anchor="end">step</text>')
    if reference is not None and lo <= reference <= hi:
        y = py(reference)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="ref"/>')
    for label, color, points in series:
        good = [(s, v) for s, v in points if v is not None]
        smooth = len(good) > 60
        for segment in _segments(points):
            if len(segment) == 1:
                s, v = segment[0]
                parts.append(f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"><title>'
                             f'{html.escape(label)}: step {s}, {fmt(v)}</title></circle>')
                continue
            coords = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in segment)
            opacity = ' stroke-opacity="0.25"' if smooth else ""
            parts.append(f'<polyline points="{coords}" stroke="{color}"{opacity} class="line"><title>'
                         f'{html.escape(label)}</title></polyline>')
        if smooth:
            k = max(3, len(good) // 30)
            averaged = [(good[i][0],
                         sum(v for _, v in good[max(0, i - k + 1):i + 1]) / len(good[max(0, i - k + 1):i + 1]))
                        for i in range(len(good))]
            coords = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in averaged)
            parts.append(f'<polyline points="{coords}" stroke="{color}" class="line avg"><title>{html.escape(label)} '
                         f'(moving average of {k} steps)</title></polyline>')
    parts.append(f'</svg><figcaption>{html.escape(note)}</figcaption></figure>')
    return "".join(parts)


def _segments(points: list[tuple[int, float | None]]) -> list[list[tuple[int, float]]]:
    segments, current = [], []
    for s, v in points:
        if v is None:
            if current:
                segments.append(current)
            current = []
        else:
            current.append((s, v))
    if current:
        segments.append(current)
    return segments

def image_data_uri(path: Path, max_px: int) -> tuple[str, int, int]:
    """(data: URI, width, height) of an image, downscaled so its longest side is at most `max_px`. Small files are
    embedded as they are; larger ones are re-encoded (PNG when small or with transparency, else JPEG)."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt, (w, h) = image.format, image.size
        if fmt in ("PNG", "JPEG") and max(w, h) <= max_px and len(data) <= MAX_EMBED_BYTES:
            mime = "image/png" if fmt == "PNG" else "image/jpeg"
            return f"data:{mime};base64,{base64.b64encode(data).decode()}", w, h
        scale = min(1.0, max_px / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = image.convert("RGBA" if "A" in image.getbands() else "RGB").resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if small.mode == "RGBA" or size[0] * size[1] <= 128 * 128:
        small.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        small.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}", *size



STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1500px;\
padding:0 24px 48px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin:20px 0 2px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin:20px 0 6px}.muted{color:#666}\
code{font-size:12.5px;background:#f3f3f3;padding:0 3px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 12px}\
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plot{margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:4px}
.plot figcaption{font-size:12px;color:#555;max-width:430px;padding:0 4px 2px}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .t{font-weight:600;font-size:12px}svg .yl{text-anchor:end}
svg .xl{text-anchor:middle}svg .frame{fill:none;stroke:#bbb}svg .grid{stroke:#eee}\
svg .ref{stroke:#888;stroke-dasharray:4 3}
svg .line{fill:none;stroke-width:1.6}svg .avg{stroke-width:2.2}
.strip{display:flex;gap:12px;overflow-x:auto;padding-bottom:6px;align-items:flex-start}
.strip figure,.renders figure{margin:0;flex:none}\
.strip figcaption,.renders figcaption{font-size:12px;color:#444;margin-top:2px}
img{display:block;max-width:100%;height:auto;border:1px solid #ddd;background:#fafafa}img.px{image-rendering:pixelated}
.run{border-left:4px solid #ccc;padding-left:14px;margin-top:26px}.damaged{color:#a40000}
.legend{font-size:12px;margin:4px 0 0;padding-left:18px}\
.badge{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee}
.badge.completed{background:#d9f2dc}.badge.failed{background:#f8d7d7}.badge.running,.badge.interrupted{background:#fbefc9}
details{margin:6px 0}summary{cursor:pointer;color:#333}
"""
# No script, and nothing from outside: images are data: URIs, styles are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"
