"""Time series drawn as the TimeMaster plot (`lightning_tokens.datamodules.time_series.render`): the
reference's exact bytes, determinism, sizes, legends, errors and the stale-safe plot cache."""

import io
import json
import warnings

import matplotlib
import numpy as np
import pytest
from PIL import Image

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.time_series.render import (
    PlotCache,
    PlotSettings,
    StalePlotWarning,
    load_plot,
    render_series,
)

SERIES = (np.sin(np.linspace(0, 12, 720)) * 3 + 1).astype(np.float32)


def image_of(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


def reference_plot(signal) -> bytes:
    """TimeMaster's ``plot_signal`` (pyplot, the default dpi), saved to memory with the same metadata."""
    import matplotlib.pyplot as plt

    plt.figure(figsize=(6, 2.5))
    plt.plot(signal, linewidth=2)
    plt.title("Complete Signal", fontsize=9)
    plt.xlabel("Timestamp", fontsize=8)
    plt.ylabel("Value", fontsize=8)
    plt.xticks(fontsize=7)
    plt.yticks(fontsize=7)
    plt.tight_layout()
    buffer = io.BytesIO()
    plt.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.05, metadata={"Software": None})
    plt.close()
    return buffer.getvalue()


# -- rendering ---------------------------------------------------------------------------------------------
def test_univariate_plot_equals_the_reference_byte_for_byte():
    assert render_series(SERIES) == reference_plot(SERIES)
    # (1, T) is the same univariate plot, without a legend
    assert render_series(SERIES[None, :]) == render_series(SERIES)


def test_rendering_is_deterministic_with_the_measured_pixel_size():
    first, second = render_series(SERIES), render_series(SERIES.tolist())
    assert first == second
    assert b"Software" not in first and b"Matplotlib" not in first
    image = image_of(first)
    # 600x250 at 100 dpi, less the tight bounding box's crop
    assert image.size == (580, 230) and image.mode == "RGBA"


def test_dpi_is_pinned_against_the_users_rcparams():
    with matplotlib.rc_context({"figure.dpi": 200, "savefig.dpi": 300}):
        png = render_series(SERIES)
    assert png == render_series(SERIES)
    assert image_of(render_series(SERIES, PlotSettings(dpi=200))).size != (580, 230)


def test_values_are_drawn_raw_not_normalised():
    plain, scaled = render_series(SERIES), render_series(10 * SERIES)
    assert plain != scaled and render_series(SERIES + 100) not in (plain, scaled)
    assert scaled == reference_plot(10 * SERIES)


def test_multivariate_plot_has_one_line_per_channel_and_a_legend():
    both = np.stack([SERIES, -SERIES])
    default = render_series(both)
    named = render_series(both, channel_names=["load", "temperature"])
    assert default != named  # the legend text differs
    assert image_of(named).size == image_of(default).size == (580, 230)
    pixels = np.asarray(image_of(default).convert("RGB"), dtype=int)
    # the second line uses the colour cycle's orange (#ff7f0e), which a univariate plot does not contain
    orange = (np.abs(pixels - [255, 127, 14]).sum(-1) < 30).sum()
    assert orange > 500
    single = np.asarray(image_of(render_series(SERIES)).convert("RGB"), dtype=int)
    assert (np.abs(single - [255, 127, 14]).sum(-1) < 30).sum() == 0
    assert render_series(both, channel_names=["load", "temperature"]) == named


def test_bad_series_raise_data_errors():
    bad = SERIES.copy()
    bad[17] = np.nan
    with pytest.raises(DataError, match=r"index 17: clean or interpolate"):
        render_series(bad)
    with pytest.raises(DataError, match=r"index \(1, 5\)"):
        render_series(np.stack([SERIES[:10], np.r_[SERIES[:5], np.inf, SERIES[6:10]]]))
    with pytest.raises(DataError, match="empty"):
        render_series([])
    with pytest.raises(DataError, match="ndim=3"):
        render_series(np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="channel_names has 1 names for a series of 2"):
        render_series(np.zeros((2, 4)), channel_names=["a"])
    with pytest.raises(DataError, match="not numeric"):
        render_series(["a", "b"])


def test_plot_settings_key_is_stable_and_sensitive():
    assert PlotSettings().key() == PlotSettings(figsize=[6, 2.5]).key()
    assert len(PlotSettings().key()) == 12
    assert PlotSettings(title="Signal").key() != PlotSettings().key()
    with pytest.raises(ConfigError, match="dpi"):
        PlotSettings(dpi=0)


# -- the cache ---------------------------------------------------------------------------------------------
def test_cache_renders_once_then_reuses(tmp_path):
    cache = PlotCache(tmp_path)
    path = cache.get("ctu", "train", 3, SERIES)
    assert path == tmp_path / "ctu" / "train" / f"000003-{PlotSettings().key()}.png"
    assert path.read_bytes() == render_series(SERIES)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["settings"]["figsize"] == [6.0, 2.5] and sidecar["matplotlib"] == matplotlib.__version__
    mtime = path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PlotCache(tmp_path).get("ctu", "train", 3, SERIES.astype(np.float64)) == path
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def test_cache_refuses_a_stale_series(tmp_path):
    cache = PlotCache(tmp_path)
    path = cache.get("ctu", "train", 0, SERIES)
    with pytest.warns(StalePlotWarning, match=r"000000-.*\.png.*the series changed"):
        again = cache.get("ctu", "train", 0, 10 * SERIES)
    assert again == path and path.read_bytes() == render_series(10 * SERIES)


def test_cache_refuses_changed_channel_names(tmp_path):
    both = np.stack([SERIES, -SERIES])
    cache = PlotCache(tmp_path)
    cache.get("ctu", "train", 0, both)
    with pytest.warns(StalePlotWarning, match="channel_names changed"):
        path = cache.get("ctu", "train", 0, both, channel_names=["a", "b"])
    assert path.read_bytes() == render_series(both, channel_names=["a", "b"])


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda s: s.write_text(s.read_text().replace(matplotlib.__version__, "0.0.1")), "matplotlib changed"),
        (lambda s: s.write_text("{not json"), "unreadable"),
        (lambda s: s.unlink(), "missing"),
    ],
)
def test_cache_refuses_a_tampered_or_missing_sidecar(tmp_path, tamper, reason):
    cache = PlotCache(tmp_path)
    path = cache.get("ctu", "test", 1, SERIES)
    path.write_bytes(b"not the plot")
    tamper(path.with_suffix(".json"))
    with pytest.warns(StalePlotWarning, match=reason):
        cache.get("ctu", "test", 1, SERIES)
    assert path.read_bytes() == render_series(SERIES)
    assert json.loads(path.with_suffix(".json").read_text())["matplotlib"] == matplotlib.__version__


def test_settings_change_the_file_name(tmp_path):
    default = PlotCache(tmp_path).get("ctu", "train", 0, SERIES)
    thin = PlotCache(tmp_path, PlotSettings(linewidth=1.0)).get("ctu", "train", 0, SERIES)
    assert default != thin and default.parent == thin.parent
    assert default.read_bytes() != thin.read_bytes()


@pytest.mark.parametrize("dataset, split", [("../x", "train"), ("a/b", "train"), ("..", "train"), ("ctu", ""), ("ctu", "a\\b")])
def test_cache_rejects_unsafe_names(tmp_path, dataset, split):
    with pytest.raises(ConfigError, match="safe folder name"):
        PlotCache(tmp_path).get(dataset, split, 0, SERIES)
    assert not any(tmp_path.parent.glob("x")) and not any(tmp_path.iterdir())


def test_cache_rejects_a_negative_index(tmp_path):
    with pytest.raises(ConfigError, match="non-negative"):
        PlotCache(tmp_path).path("ctu", "train", -1)


# -- loading -----------------------------------------------------------------------------------------------
def test_loaded_plot_is_rgb_and_the_png_alpha_is_opaque(tmp_path):
    path = PlotCache(tmp_path).get("ctu", "train", 0, np.stack([SERIES, -SERIES]))
    with Image.open(path) as raw:
        rgba = np.asarray(raw)
    assert rgba.shape == (230, 580, 4) and (rgba[..., 3] == 255).all()
    image = load_plot(path)
    assert image.mode == "RGB" and image.size == (580, 230)
    assert np.array_equal(np.asarray(image), rgba[..., :3])
    with pytest.raises(MissingFileError):
        load_plot(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable image"):
        load_plot(tmp_path / "bad.png")
