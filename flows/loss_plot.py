"""The report's loss curve as a picture: a small SVG of train and eval loss by step, with no plotting library
to install (a worker image need not carry matplotlib for one chart)."""

from __future__ import annotations

from html import escape

from olive_grove.tasks.adapters import LossPoint

WIDTH, HEIGHT, MARGIN = 480, 240, 40
COLOURS = {"train loss": "#1f77b4", "eval loss": "#d62728"}


def loss_svg(train: list[LossPoint], evaluation: list[LossPoint]) -> str:
    """Both curves on shared axes: steps across, loss up; the axes name their ranges."""
    series = {name: points for name, points in (("train loss", train), ("eval loss", evaluation)) if points}
    points = [p for curve in series.values() for p in curve]
    first, last = min(p.step for p in points), max(p.step for p in points)
    low, high = min(p.loss for p in points), max(p.loss for p in points)

    def x(step: int) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * ((step - first) / (last - first) if last > first else 0.5)

    def y(loss: float) -> float:
        return HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * ((loss - low) / (high - low) if high > low else 0.5)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
             f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
             f'<text x="{MARGIN}" y="{HEIGHT - MARGIN + 14}">step {first}</text>',
             f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 14}" text-anchor="end">step {last}</text>',
             f'<text x="{MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{high:.3g}</text>',
             f'<text x="{MARGIN - 4}" y="{HEIGHT - MARGIN}" text-anchor="end">{low:.3g}</text>']  # fmt: skip
    for row, (name, curve) in enumerate(series.items()):
        colour = COLOURS[name]
        line = " ".join(f"{x(p.step):.1f},{y(p.loss):.1f}" for p in curve)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(p.step):.1f}" cy="{y(p.loss):.1f}" r="2.5" fill="{colour}"/>' for p in curve]
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{MARGIN + 14 * row}" text-anchor="end" fill="{colour}">'
                     f"{escape(name)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)
