"""Time series drawn as the TimeMaster paper's line plot, and an on-disk cache of those plots.

The plot matches the reference data scripts of TimeMaster (``plot_signal``): a 6 x 2.5 inch figure, one
line of width 2 per channel, the title "Complete Signal" (font size 9), the axis labels "Timestamp" and
"Value" (font size 8), tick labels of font size 7, ``tight_layout`` and a tight bounding box with 0.05 inch
padding. Values are drawn raw (no normalisation). A multivariate series ``(C, T)`` gets one line per
channel and a legend (font size 7); a univariate one (``(T,)`` or ``(1, T)``) gets no legend.

Rendering uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no change to the
global backend. Two things are pinned so that a user's ``rcParams`` cannot change the image size or its
opacity: the resolution (``dpi=100``, matplotlib's default, which the reference relies on) and a white
figure/savefig background (the default, so the PNG's alpha channel is 255 everywhere and RGB loses
nothing). Other rcParams (fonts, colour cycle, style) apply, as they do to the reference's pyplot.

Example:
    >>> png = render_series([0.0, 1.0, 0.5, 2.0])
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError

__all__ = ["PlotCache", "PlotSettings", "StalePlotWarning", "load_plot", "render_series"]

# Without "Software" (matplotlib's version) the PNG holds no metadata that varies; PNG has no timestamp.
_PNG_METADATA: dict[str, Any] = {"Software": None}
_BACKGROUND = "white"


class StalePlotWarning(UserWarning):
    """A cached plot no longer matched its series, settings or matplotlib version and was re-rendered."""


@dataclass(frozen=True)
class PlotSettings:
    """How a series is drawn; the defaults are the TimeMaster reference's.

    Example:
        >>> PlotSettings().key() == PlotSettings().key()
        True
        >>> PlotSettings(linewidth=1.0).key() == PlotSettings().key()
        False
    """

    figsize: tuple[float, float] = (6.0, 2.5)
    linewidth: float = 2.0
    title: str = "Complete Signal"
    title_fontsize: float = 9
    xlabel: str = "Timestamp"
    ylabel: str = "Value"
    label_fontsize: float = 8
    tick_fontsize: float = 7
    dpi: int = 100
    pad_inches: float = 0.05

    def __post_init__(self) -> None:
        if len(self.figsize) != 2 or min(self.figsize) <= 0:
            raise ConfigError(f"PlotSettings.figsize={self.figsize!r} must be two positive inches, e.g. (6.0, 2.5).")
        if self.dpi <= 0:
            raise ConfigError(f"PlotSettings.dpi={self.dpi!r} must be positive, e.g. 100.")
        # A list would make the frozen dataclass unhashable and its key depend on the type given.
        object.__setattr__(self, "figsize", (float(self.figsize[0]), float(self.figsize[1])))

    def key(self) -> str:
        """A short stable hash of the settings (sha256 of their sorted JSON, first 12 hex digits).

        Example:
            >>> len(PlotSettings().key())
            12
        """
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _as_channels(values: Any) -> np.ndarray:
    """The series as a float64 C-contiguous ``(C, T)`` array, after checking it is finite and non-empty."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"the time series is not numeric ({error}): pass a (T,) or (C, T) array of numbers.") from None
    if array.ndim not in (1, 2):
        raise DataError(
            f"the time series has shape {array.shape} (ndim={array.ndim}): pass a univariate (T,) or a "
            "multivariate (C, T) array."
        )
    if array.size == 0:
        raise DataError(f"the time series is empty (shape {array.shape}): pass at least one value per channel.")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        where = int(bad[0][0]) if array.ndim == 1 else tuple(int(i) for i in bad[0])
        first = array[tuple(bad[0])]
        raise DataError(
            f"the time series holds a non-finite value ({first}) at index {where}: clean or interpolate the "
            "series (e.g. fill NaN by linear interpolation) before plotting."
        )
    return np.ascontiguousarray(array.reshape(1, -1) if array.ndim == 1 else array)


def _legend_names(channels: np.ndarray, channel_names: Sequence[str] | None) -> list[str] | None:
    """The legend entries: the given names, else ``channel i``; ``None`` for a univariate series."""
    count = channels.shape[0]
    if channel_names is not None:
        if isinstance(channel_names, str) or len(channel_names) != count:
            given = repr(channel_names) if isinstance(channel_names, str) else f"{len(channel_names)} names"
            raise DataError(
                f"channel_names has {given} for a series of {count} channel(s): pass one name per channel "
                "(a list of strings) or none."
            )
    if count == 1:
        return None
    return [str(name) for name in channel_names] if channel_names is not None else [f"channel {i}" for i in range(count)]


def _draw(channels: np.ndarray, names: list[str] | None, settings: PlotSettings) -> bytes:
    figure = Figure(figsize=settings.figsize, dpi=settings.dpi, facecolor=_BACKGROUND)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, row in enumerate(channels):
        axes.plot(row, linewidth=settings.linewidth, label=None if names is None else names[i])
    axes.set_title(settings.title, fontsize=settings.title_fontsize)
    axes.set_xlabel(settings.xlabel, fontsize=settings.label_fontsize)
    axes.set_ylabel(settings.ylabel, fontsize=settings.label_fontsize)
    # As pyplot's ``xticks(fontsize=...)``: restyle the current tick labels (new ticks copy them) instead of
    # ``tick_params(labelsize=...)``, which would also make the locators place more ticks than the reference.
    for label in [*axes.get_xticklabels(), *axes.get_yticklabels()]:
        label.set_fontsize(settings.tick_fontsize)
    if names is not None:
        axes.legend(fontsize=settings.tick_fontsize)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(
        buffer,
        format="png",
        dpi=settings.dpi,
        facecolor=_BACKGROUND,
        bbox_inches="tight",
        pad_inches=settings.pad_inches,
        metadata=_PNG_METADATA,
    )
    return buffer.getvalue()


def render_series(
    values: Any, settings: PlotSettings | None = None, channel_names: Sequence[str] | None = None
) -> bytes:
    """The series drawn as the TimeMaster plot, as PNG bytes (the same input gives the same bytes).

    Args:
        values: a univariate ``(T,)`` / ``(1, T)`` or multivariate ``(C, T)`` array of finite numbers.
        settings: how to draw it; the reference's defaults when ``None``.
        channel_names: the legend's names of a multivariate series (``channel i`` when ``None``); one per
            channel. A univariate series has no legend.

    Returns:
        The PNG file's bytes.

    Raises:
        DataError: a NaN or infinite value (the message names its index), an empty series, a series that is
            not 1- or 2-dimensional, or a ``channel_names`` of the wrong length.

    Example:
        >>> render_series([[0, 1, 2], [2, 1, 0]], channel_names=["a", "b"])[:4]
        b'\\x89PNG'
    """
    channels = _as_channels(values)
    names = _legend_names(channels, channel_names)
    return _draw(channels, names, settings or PlotSettings())


def series_sha256(values: Any) -> str:
    """sha256 of the series' shape and its float64 C-contiguous bytes (what a cached plot was drawn from).

    Example:
        >>> series_sha256([1, 2]) == series_sha256(np.array([1.0, 2.0], dtype=np.float32))
        True
    """
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    digest = hashlib.sha256(json.dumps(list(array.shape)).encode("ascii"))
    digest.update(array.tobytes())
    return digest.hexdigest()


def _safe_part(value: str, field: str) -> str:
    """``value`` as one folder name; path separators, ``.``/``..`` and empty names are refused, not rewritten."""
    text = str(value)
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not text or text in {".", ".."} or any(sep in text for sep in separators) or "\0" in text:
        raise ConfigError(
            f"{field}={value!r} is not a safe folder name: use a name without path separators, '.' or '..' "
            "(e.g. 'ctu' or 'train')."
        )
    return text


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then replace it in one step (readers never see a partial file)."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class PlotCache:
    """Rendered plots on disk, keyed by dataset, split, index and the rendering settings.

    The PNG lives at ``root/<dataset>/<split>/<index:06d>-<settings.key()>.png`` beside a JSON sidecar
    (same name, ``.json``) holding ``series_sha256``, ``settings``, ``matplotlib`` (its version) and
    ``channel_names`` (the legend drawn, ``None`` for a univariate series). :meth:`get` reuses a PNG only
    when its sidecar matches all four; otherwise it re-renders, and warns (:class:`StalePlotWarning`)
    when an old entry was stale. Files are replaced atomically, so concurrent writers are safe (they write
    the same bytes). Dataset and split names are used as given; names with path separators, ``.`` or ``..``
    raise :class:`ConfigError` (no slugifying, so two names never share a folder).

    Example:
        >>> import tempfile
        >>> cache = PlotCache(tempfile.mkdtemp())
        >>> path = cache.get("ctu", "train", 3, [0.0, 1.0, 0.5])
        >>> path.name == f"000003-{PlotSettings().key()}.png", path.read_bytes() == render_series([0.0, 1.0, 0.5])
        (True, True)
    """

    def __init__(self, root: str | os.PathLike, settings: PlotSettings | None = None) -> None:
        self.root = Path(root)
        self.settings = settings or PlotSettings()

    def path(self, dataset: str, split: str, index: int) -> Path:
        """Where the plot of ``dataset``/``split`` item ``index`` lives (its sidecar: ``.json`` suffix).

        Example:
            >>> PlotCache("plots").path("ctu", "test", 7).parent
            PosixPath('plots/ctu/test')
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ConfigError(f"index={index!r} must be a non-negative integer (the item's position in its split).")
        folder = self.root / _safe_part(dataset, "dataset") / _safe_part(split, "split")
        return folder / f"{int(index):06d}-{self.settings.key()}.png"

    def get(
        self, dataset: str, split: str, index: int, values: Any, channel_names: Sequence[str] | None = None
    ) -> Path:
        """The path of the item's up-to-date plot, rendering it when missing or stale.

        Args:
            dataset: the dataset's name (one folder level).
            split: the split's name (one folder level).
            index: the item's position in the split.
            values: the series, as for :func:`render_series`.
            channel_names: the legend names, as for :func:`render_series`.

        Returns:
            The PNG's path.

        Raises:
            ConfigError: an unsafe dataset/split name or a negative index.
            DataError: a bad series (see :func:`render_series`).

        Example:
            >>> import tempfile
            >>> PlotCache(tempfile.mkdtemp()).get("ctu", "train", 0, [1.0, 2.0]).suffix
            '.png'
        """
        png = self.path(dataset, split, index)
        sidecar = png.with_suffix(".json")
        channels = _as_channels(values)
        names = _legend_names(channels, channel_names)
        expected = {
            "series_sha256": series_sha256(values),
            "settings": json.loads(json.dumps(asdict(self.settings))),
            "matplotlib": matplotlib.__version__,
            "channel_names": names,
        }
        if png.exists():
            reason = _stale_reason(sidecar, expected)
            if reason is None:
                return png
            warnings.warn(f"stale cached plot {png}: {reason}; re-rendering it.", StalePlotWarning, stacklevel=2)
        png.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(png, _draw(channels, names, self.settings))
        _write_atomic(sidecar, (json.dumps(expected, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return png


def _stale_reason(sidecar: Path, expected: dict[str, Any]) -> str | None:
    """Why the cached PNG beside ``sidecar`` cannot be reused, or ``None`` when it can."""
    if not sidecar.exists():
        return f"its sidecar {sidecar.name} is missing"
    try:
        found = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its sidecar {sidecar.name} is unreadable ({error})"
    if not isinstance(found, dict):
        return f"its sidecar {sidecar.name} is not a JSON object"
    changed = [field for field, value in expected.items() if found.get(field) != value]
    if not changed:
        return None
    details = {"series_sha256": "the series changed", "settings": "the plot settings changed"}
    parts = [details.get(field, f"{field} changed ({found.get(field)!r} -> {expected[field]!r})") for field in changed]
    return "; ".join(parts)


def load_plot(path: str | os.PathLike) -> Image.Image:
    """A rendered plot as an RGB image (the PNG is RGBA with an opaque white background, so nothing is lost).

    Example:
        >>> import tempfile
        >>> load_plot(PlotCache(tempfile.mkdtemp()).get("ctu", "train", 0, [1.0, 2.0])).mode
        'RGB'
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"plot {path} does not exist: render it with PlotCache.get or render_series.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DataError(f"plot {path} is not a readable image ({error}): delete it and render it again.") from None
