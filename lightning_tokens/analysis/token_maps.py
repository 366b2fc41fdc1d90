"""Token heat maps: each token of a text coloured by a per-token value, as a PNG (matplotlib, Agg canvas, tokens
wrapped into lines) and as a self-contained HTML page (the value and any per-token details on hover).

One renderer for everything the library shows token by token: the saliency maps
(:mod:`lightning_tokens.analysis.saliency`, ``lightning-tokens saliency``) and what the token methods chose
during training (:class:`~lightning_tokens.callbacks.token_maps.TokenMapLogger`).

Example::

    maps = [TokenMap(tokens=["The", " cat", " sat"], values=[float("nan"), 0.2, 1.0], title="example 0")]
    render_png(maps, "map.png", ColorScale(cmap="YlGnBu", vmin=0, vmax=1, label="weight"))
    render_html(maps, "map.html", ColorScale(cmap="YlGnBu", vmin=0, vmax=1, label="weight"))
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "ColorScale",
    "TokenMap",
    "display_text",
    "render_html",
    "render_image",
    "render_png",
    "wrap_tokens",
    "write_token_maps",
]

# DejaVu Sans Mono (shipped with matplotlib): advance width 0.602 em
_CHAR_EM = 0.602
_FONT = "DejaVu Sans Mono"


@dataclass
class TokenMap:
    """One text, token by token.

    Attributes:
        tokens: the tokens' text, in order (``"\\n"`` inside a token ends its line).
        values: one value per token; ``nan`` for tokens that carry none (drawn without colour, e.g. a prompt).
        details: per token, what the hover shows besides the value (e.g. each method's weight).
        dropped: per token, drawn struck through (left out of the loss).
        title: a heading above the text.
    """

    tokens: list[str]
    values: list[float]
    details: list[dict[str, Any]] | None = None
    dropped: list[bool] | None = None
    title: str = ""

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in ("values", "details", "dropped"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ConfigError(f"TokenMap.{name} has {len(value)} entries for {n} tokens: give one per token.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``nan`` → ``None``)."""
        return {
            "title": self.title,
            "tokens": [
                {
                    "token": t,
                    "value": None if not math.isfinite(v) else float(v),
                    **({"dropped": bool(self.dropped[i])} if self.dropped is not None else {}),
                    **({"details": _plain(self.details[i])} if self.details is not None else {}),
                }
                for i, (t, v) in enumerate(zip(self.tokens, self.values))
            ],
        }


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in details.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


@dataclass
class ColorScale:
    """How values become colours.

    Attributes:
        cmap: a matplotlib colormap name (``YlGnBu`` for weights, ``RdBu`` for signed differences).
        vmin: lowest value of the scale (``None``: from the data).
        vmax: highest value (``None``: from the data).
        center: a value to centre the scale on (symmetric limits around it, e.g. 0 for differences).
        label: the colour bar's label.
    """

    cmap: str = "YlGnBu"
    vmin: float | None = None
    vmax: float | None = None
    center: float | None = None
    label: str = "value"

    def limits(self, maps: Sequence[TokenMap]) -> tuple[float, float]:
        """``(low, high)`` of the scale for these maps.

        Example:
            >>> ColorScale(center=0.0).limits([TokenMap(["a", "b"], [-0.5, 2.0])])
            (-2.0, 2.0)
        """
        finite = [v for m in maps for v in m.values if math.isfinite(v)]
        if self.center is not None:
            spread = max((abs(v - self.center) for v in finite), default=0.0)
            if self.vmin is not None and self.vmax is not None:
                spread = max(self.center - self.vmin, self.vmax - self.center)
            spread = spread if spread > 0 else 1.0
            return self.center - spread, self.center + spread
        low = self.vmin if self.vmin is not None else min(finite, default=0.0)
        high = self.vmax if self.vmax is not None else max(finite, default=1.0)
        if high <= low:
            high = low + 1.0
        return float(low), float(high)

    def colormap(self) -> Any:
        import matplotlib

        try:
            return matplotlib.colormaps[self.cmap]
        except KeyError:
            raise ConfigError(f"ColorScale(cmap={self.cmap!r}) is not a matplotlib colormap (e.g. YlGnBu, RdBu, viridis).") from None

    def rgb(self, value: float, low: float, high: float) -> tuple[float, float, float] | None:
        """The colour of ``value`` (``None`` for ``nan``)."""
        if not math.isfinite(value):
            return None
        fraction = min(max((value - low) / (high - low), 0.0), 1.0)
        r, g, b, _ = self.colormap()(fraction)
        return float(r), float(g), float(b)


def _text_color(rgb: tuple[float, float, float] | None) -> str:
    if rgb is None:
        return "#888888"
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000000" if luminance > 0.5 else "#ffffff"


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def display_text(token: str) -> str:
    """A token as drawn: newlines as ``↵``, tabs as ``→``, other control characters as ``\\xNN``, an empty
    token as ``∅``.

    Example:
        >>> display_text("a\\n"), display_text("\\t"), display_text("")
        ('a↵', '→', '∅')
    """
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def wrap_tokens(tokens: Sequence[str], width: int = 96) -> list[list[int]]:
    """Greedy line wrapping of tokens (by their :func:`display_text` length) into lines of at most ``width``
    characters; a token with a newline ends its line, a token longer than ``width`` gets a line of its own.

    Returns:
        the token indices of each line.

    Example:
        >>> wrap_tokens(["ab", "cd", "e\\n", "fgh"], width=4)
        [[0, 1], [2], [3]]
    """
    if width < 1:
        raise ConfigError(f"width={width} must be >= 1 (characters per line).")
    lines: list[list[int]] = [[]]
    used = 0
    for i, token in enumerate(tokens):
        size = len(display_text(token))
        if lines[-1] and used + size > width:
            lines.append([])
            used = 0
        lines[-1].append(i)
        used += size
        if "\n" in token:
            lines.append([])
            used = 0
    if not lines[-1] and len(lines) > 1:
        lines.pop()
    return lines


@functools.lru_cache(maxsize=16)
def _char_width(fontsize: float, dpi: int) -> float:
    """The advance of one character of the monospace font as Agg draws it, in inches (hinting rounds glyph
    advances to whole pixels, so the nominal 0.602 em would leave gaps after long tokens)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 1), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    text = fig.text(0, 0.5, "M" * 100, fontsize=fontsize, family=_FONT)
    extent = text.get_window_extent(renderer=canvas.get_renderer())
    return extent.width / 100 / dpi if extent.width > 0 else _CHAR_EM * fontsize / 72.0


def _figure(maps: Sequence[TokenMap], scale: ColorScale, width: int, fontsize: float, dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not maps:
        raise ConfigError("no token maps to render: give at least one TokenMap.")
    low, high = scale.limits(maps)
    char_w = _char_width(fontsize, dpi)  # inches
    row_h = 1.55 * fontsize / 72.0
    margin = 0.15
    layouts = [wrap_tokens(m.tokens, width) for m in maps]
    longest = max((sum(len(display_text(m.tokens[i])) for i in line) for m, lines in zip(maps, layouts) for line in lines), default=1)
    longest = max([longest] + [min(len(m.title), width) for m in maps])
    fig_w = max(longest, 64) * char_w + 2 * margin
    rows = sum(len(lines) + (1 if m.title else 0) + 0.6 for m, lines in zip(maps, layouts))
    bar_h = 0.75
    fig_h = rows * row_h + 2 * margin + bar_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)
    ax.axis("off")
    y = margin
    for token_map, lines in zip(maps, layouts):
        if token_map.title:
            room = int((fig_w - 2 * margin) / char_w)
            title = token_map.title if len(token_map.title) <= room else token_map.title[: max(room - 1, 1)] + "…"
            ax.text(margin, y + row_h / 2, title, fontsize=fontsize, family=_FONT, fontweight="bold", va="center", ha="left")
            y += row_h
        for line in lines:
            x = margin
            for i in line:
                text = display_text(token_map.tokens[i])
                w = len(text) * char_w
                rgb = scale.rgb(token_map.values[i], low, high)
                if rgb is not None:
                    ax.add_patch(Rectangle((x, y + 0.08 * row_h), w, 0.84 * row_h, facecolor=rgb, edgecolor="none"))
                color = _text_color(rgb)
                dropped = token_map.dropped is not None and token_map.dropped[i]
                if dropped:
                    color = "#b00000"
                ax.text(x, y + row_h / 2, text, fontsize=fontsize, family=_FONT, va="center", ha="left", color=color)
                if dropped:
                    ax.plot([x, x + w], [y + row_h / 2, y + row_h / 2], color="#b00000", linewidth=0.8)
                x += w
            y += row_h
        y += 0.6 * row_h
    cax = fig.add_axes((margin / fig_w, (margin + 0.32) / fig_h, 3.5 / fig_w, 0.14 / fig_h))
    mappable = ScalarMappable(norm=Normalize(low, high), cmap=scale.colormap())
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    bar.set_label(scale.label, fontsize=max(fontsize - 1, 6))
    bar.ax.tick_params(labelsize=max(fontsize - 2, 6))
    if any(m.dropped is not None and any(m.dropped) for m in maps):
        fig.text((margin + 3.8) / fig_w, (margin + 0.32) / fig_h, "struck through: dropped", fontsize=max(fontsize - 1, 6), color="#b00000")
    return fig


def render_image(
    maps: Sequence[TokenMap], scale: ColorScale | None = None, width: int = 96, fontsize: float = 10, dpi: int = 100
) -> np.ndarray:
    """The maps drawn into an ``(H, W, 3)`` uint8 array (what loggers' ``add_image`` / ``log_image`` take)."""
    import warnings

    fig = _figure(maps, scale or ColorScale(), width, fontsize, dpi)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def render_png(
    maps: Sequence[TokenMap], path: str, scale: ColorScale | None = None, width: int = 96, fontsize: float = 10, dpi: int = 100
) -> str:
    """Draw the maps (tokens wrapped at ``width`` characters, a colour bar below) into the PNG ``path``."""
    import warnings

    fig = _figure(maps, scale or ColorScale(), width, fontsize, dpi)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, dpi=dpi)
    return path


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _hover(token: str, value: float, details: dict[str, Any] | None, label: str, dropped: bool) -> str:
    lines = [f"token: {token!r}", f"{label}: {_format(value)}"]
    if dropped:
        lines.append("dropped from the loss")
    for key, item in (details or {}).items():
        lines.append(f"{key}: {_format(item)}")
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.map { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.9;
       border: 1px solid #ddd; border-radius: 4px; padding: .6em .8em; margin: .3em 0 1.2em 0; }
.t { border-radius: 2px; padding: 1px 0; cursor: default; }
.t:hover { outline: 2px solid #000; }
.none { color: #888; }
.dropped { text-decoration: line-through; text-decoration-color: #b00000; color: #b00000; }
.legend { display: flex; align-items: center; gap: .6em; font-size: .9em; margin-bottom: 1em; }
.bar { width: 16em; height: .9em; border: 1px solid #aaa; }
"""


def render_html(
    maps: Sequence[TokenMap], path: str, scale: ColorScale | None = None, title: str = "Token map"
) -> str:
    """A self-contained HTML page (no scripts, no external files): one block per map, every token a span
    coloured by its value whose hover text shows the value and its details."""
    scale = scale or ColorScale()
    low, high = scale.limits(maps)
    stops = ", ".join(_hex(scale.rgb(low + (high - low) * k / 10, low, high)) for k in range(11))  # type: ignore[arg-type]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="legend"><span>{html.escape(scale.label)}</span><span>{low:.3g}</span>'
        f'<span class="bar" style="background: linear-gradient(to right, {stops})"></span><span>{high:.3g}</span>'
        "<span>(hover a token for its values; grey: no value"
        + ("; struck through: dropped" if any(m.dropped is not None and any(m.dropped) for m in maps) else "")
        + ")</span></div>",
    ]
    for token_map in maps:
        if token_map.title:
            parts.append(f"<h3>{html.escape(token_map.title)}</h3>")
        spans = []
        for i, token in enumerate(token_map.tokens):
            value = token_map.values[i]
            rgb = scale.rgb(value, low, high)
            dropped = token_map.dropped is not None and bool(token_map.dropped[i])
            classes = ["t"] + (["none"] if rgb is None else []) + (["dropped"] if dropped else [])
            style = "" if rgb is None else f' style="background:{_hex(rgb)};color:{_text_color(rgb)}"'
            hover = _hover(token, value, None if token_map.details is None else token_map.details[i], scale.label, dropped)
            shown = display_text(token) + ("\n" if "\n" in token else "")
            spans.append(
                f'<span class="{" ".join(classes)}"{style} title="{html.escape(hover, quote=True)}">{html.escape(shown)}</span>'
            )
        parts.append(f'<div class="map">{"".join(spans)}</div>')
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return path


def write_token_maps(
    maps: Sequence[TokenMap], folder: str, stem: str = "token_map", scale: ColorScale | None = None,
    title: str = "Token map", width: int = 96,
) -> dict[str, str]:
    """``<stem>.png``, ``<stem>.html`` and ``<stem>.json`` (the maps as data) in ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {ext: os.path.join(folder, f"{stem}.{ext}") for ext in ("png", "html", "json")}
    render_png(maps, paths["png"], scale, width=width)
    render_html(maps, paths["html"], scale, title=title)
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump({"title": title, "maps": [m.to_dict() for m in maps]}, handle, indent=1)
    return paths
