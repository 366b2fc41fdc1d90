"""The token heat-map renderer: wrapping, colour limits, the PNG's colours, the HTML's hover text."""

import json
import math

import numpy as np
import pytest

from lightning_tokens.analysis.token_maps import (
    ColorScale,
    TokenMap,
    display_text,
    render_html,
    render_image,
    render_png,
    wrap_tokens,
    write_token_maps,
)
from lightning_tokens.core.errors import ConfigError

NAN = float("nan")


def test_wrapping_and_display_text():
    assert wrap_tokens(["ab", "cd", "ef"], width=4) == [[0, 1], [2]]
    assert wrap_tokens(["a\n", "b"], width=10) == [[0], [1]]
    assert wrap_tokens(["a very long token", "b"], width=5) == [[0], [1]]  # its own line
    assert wrap_tokens([], width=5) == [[]]
    assert display_text("x\ny\t\x01") == "x↵y→\\x01"
    with pytest.raises(ConfigError, match="width=0"):
        wrap_tokens(["a"], width=0)


def test_color_limits():
    maps = [TokenMap(["a", "b", "c"], [NAN, -0.5, 2.0])]
    assert ColorScale(center=0.0).limits(maps) == (-2.0, 2.0)
    assert ColorScale().limits(maps) == (-0.5, 2.0)
    assert ColorScale(vmin=0.0, vmax=1.0).limits(maps) == (0.0, 1.0)
    assert ColorScale().limits([TokenMap(["a"], [NAN])]) == (0.0, 1.0)
    assert ColorScale(vmin=3.0).limits([TokenMap(["a"], [3.0])]) == (3.0, 4.0)  # never an empty range
    with pytest.raises(ConfigError, match="3 tokens"):
        TokenMap(["a", "b", "c"], [1.0])
    with pytest.raises(ConfigError, match="not a matplotlib colormap"):
        ColorScale(cmap="nope").rgb(0.5, 0.0, 1.0)


def _colour_present(image, rgb):
    target = np.array([round(c * 255) for c in rgb])
    return bool((np.abs(image.astype(int) - target) <= 1).all(-1).any())


def test_png_draws_each_value_in_its_colour(tmp_path):
    scale = ColorScale(cmap="viridis", vmin=0.0, vmax=1.0)
    maps = [TokenMap(["low", " high", " none"], [0.0, 1.0, NAN], title="t")]
    image = render_image(maps, scale, width=40)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert _colour_present(image, scale.rgb(0.0, 0.0, 1.0)) and _colour_present(image, scale.rgb(1.0, 0.0, 1.0))
    path = render_png(maps, str(tmp_path / "m.png"), scale, width=40)
    import matplotlib.image

    png = matplotlib.image.imread(path)
    assert png.shape[:2] == image.shape[:2]
    # more tokens than fit a line: the image grows downwards, not sideways
    long = render_image([TokenMap(["word "] * 200, [0.5] * 200)], scale, width=40)
    assert long.shape[1] == image.shape[1] and long.shape[0] > image.shape[0]


def test_html_is_self_contained_with_values_and_details_on_hover(tmp_path):
    maps = [
        TokenMap(["<b>", " ok", "\n", "x"], [0.25, 1.0, NAN, 0.0], dropped=[False, False, False, True],
                 details=[{"DFT.weight": 0.25, "Rho1.kept": 1.0}, {}, {}, {"Rho1.kept": 0.0}], title="example & 0"),
    ]
    path = render_html(maps, str(tmp_path / "m.html"), ColorScale(vmin=0, vmax=1, label="weight"), title="Weights")
    text = open(path, encoding="utf-8").read()
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    assert "&lt;b&gt;</span>" in text and "<b>" not in text  # tokens are escaped
    assert "example &amp; 0" in text
    assert "DFT.weight: 0.25" in text and "weight: 0.25" in text
    assert 'class="t dropped"' in text and "dropped from the loss" in text
    assert 'class="t none"' in text  # the newline token has no value
    assert text.count('<span class="t') == 4


def test_write_token_maps_writes_png_html_and_json(tmp_path):
    maps = [TokenMap(["a", "b"], [0.5, NAN], details=[{"k": math.inf}, {}])]
    paths = write_token_maps(maps, str(tmp_path / "out"), "step_1", ColorScale())
    assert all((tmp_path / "out" / f"step_1.{ext}").exists() for ext in ("png", "html", "json"))
    data = json.loads(open(paths["json"]).read())
    assert data["maps"][0]["tokens"][0] == {"token": "a", "value": 0.5, "details": {"k": None}}
    assert data["maps"][0]["tokens"][1]["value"] is None
    with pytest.raises(ConfigError, match="at least one"):
        render_image([])
