"""VisionTokenMask: the spec's rule checks (token grid, dilation, PHI reduction), bad boxes, and the forward hook
on toy encoders inside a Trainer and on the GVT composition's vision encoder."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_tokens.callbacks.vision_token_mask import (
    VisionTokenMask,
    apply_token_mask,
    hybrid_reduction,
    phi_reduction,
    token_mask_from_boxes,
    token_masks_from_boxes,
)
from lightning_tokens.core.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def _cells(mask):
    return sorted(map(tuple, mask.nonzero().tolist()))


# ---- rule checks -------------------------------------------------------------------------------
def test_spec_rule_checks_on_a_1024_page_with_a_16_grid():
    box = [[64, 64, 127, 127]]
    assert _cells(token_mask_from_boxes(box, 1024, 16)) == [(1, 1)]
    one = token_mask_from_boxes(box, 1024, 16, radius=1)
    assert int(one.sum()) == 9 and _cells(one) == [(r, c) for r in range(3) for c in range(3)]
    two = token_mask_from_boxes(box, 1024, 16, radius=2)
    assert int(two.sum()) == 16 and _cells(two) == [(r, c) for r in range(4) for c in range(4)]  # border clips 5x5
    interior = token_mask_from_boxes([[512, 512, 575, 575]], 1024, 16, radius=2)
    assert int(interior.sum()) == 25 and _cells(interior)[0] == (6, 6) and _cells(interior)[-1] == (10, 10)
    assert token_mask_from_boxes(box, 1024, 16).shape == (16, 16) and token_mask_from_boxes(box, 1024, 16).dtype == torch.bool


def test_cell_overlap_is_inclusive_and_exact():
    # pixel 64 is the first pixel of cell 1: a box ending there reaches it, one ending at 63 does not
    assert _cells(token_mask_from_boxes([[0, 0, 64, 63]], 1024, 16)) == [(0, 0), (0, 1)]
    assert _cells(token_mask_from_boxes([[0, 0, 63, 63]], 1024, 16)) == [(0, 0)]
    # 10 px over 3 cells (edges at 3.33, 6.67): pixel 3 spans [3, 4) and touches cells 0 and 1
    assert _cells(token_mask_from_boxes([[3, 3, 3, 3]], 10, 3)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert _cells(token_mask_from_boxes([[7, 0, 9, 2]], 10, 3)) == [(0, 2)]
    assert _cells(token_mask_from_boxes([[1023, 1023, 1023, 1023]], 1024, 16)) == [(15, 15)]
    assert not token_mask_from_boxes([], 1024, 16).any()
    union = token_mask_from_boxes(torch.tensor([[0, 0, 10, 10], [960, 0, 1000, 10]]), 1024, 16)
    assert _cells(union) == [(0, 0), (0, 15)]


def test_rectangular_image_and_grid():
    # 64 x 128 px (H, W) into 2 x 4 cells of 32 x 32: x spans columns, y spans rows
    mask = token_mask_from_boxes([[40, 0, 70, 10]], (64, 128), (2, 4))
    assert mask.shape == (2, 4) and _cells(mask) == [(0, 1), (0, 2)]
    dilated = token_mask_from_boxes([[100, 40, 110, 50]], (64, 128), (2, 4), radius=1)
    assert _cells(dilated) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    # a square image on a rectangular grid: cells are 16 px wide, 32 px tall
    assert _cells(token_mask_from_boxes([[16, 32, 16, 32]], 64, (2, 4))) == [(1, 1)]
    with pytest.raises(DataError, match=r"boxes\[0\]\.y1=64 lies outside the image \(height 64"):
        token_mask_from_boxes([[0, 0, 100, 64]], (64, 128), (2, 4))


def test_batch_helper_stacks_one_mask_per_image():
    batch = [[[64, 64, 127, 127]], [], [[0, 0, 1023, 1023]]]
    masks = token_masks_from_boxes(batch, 1024, 16, radius=1)
    assert masks.shape == (3, 16, 16) and masks.dtype == torch.bool
    assert torch.equal(masks[0], token_mask_from_boxes(batch[0], 1024, 16, radius=1))
    assert int(masks[1].sum()) == 0 and bool(masks[2].all())
    assert token_masks_from_boxes([], 1024, (4, 8)).shape == (0, 4, 8)
    with pytest.raises(DataError, match=r"boxes\[2\]\[1\]\.x0=-1"):
        token_masks_from_boxes([[], [], [[0, 0, 5, 5], [-1, 0, 5, 5]]], 1024, 16)


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ([[0, 0, 10, 10], [0, 0, 1024, 10]], r"boxes\[1\]\.x1=1024 lies outside the image \(width 1024: pixels 0\.\.1023"),
        ([[20, 0, 10, 10]], r"boxes\[0\]\.x1=10 < x0=20"),
        ([[0, 30, 10, 5]], r"boxes\[0\]\.y1=5 < y0=30"),
        ([[0, 0, 10]], r"boxes\[0\] has 3 values"),
        ([[0, float("nan"), 10, 10]], r"boxes\[0\]\.y0=nan must be a finite number"),
        ([[2000, 2000, 2100, 2100]], r"boxes\[0\]\.x0=2000 lies outside"),
    ],
)
def test_bad_boxes_name_the_index_and_field(boxes, message):
    with pytest.raises(DataError, match=message):
        token_mask_from_boxes(boxes, 1024, 16)


def test_bad_sizes_and_radius_are_config_errors():
    with pytest.raises(ConfigError, match="grid_size=0"):
        token_mask_from_boxes([], 1024, 0)
    with pytest.raises(ConfigError, match="image_size"):
        token_mask_from_boxes([], (1024, 1024, 3), 16)
    with pytest.raises(ConfigError, match="radius=-1"):
        token_mask_from_boxes([], 1024, 16, radius=-1)


def test_phi_reduction_and_hybrid():
    assert phi_reduction([1, 1, 1, 0, 0, 0, 0]) == pytest.approx(0.428571, abs=5e-7)
    assert hybrid_reduction([1, 1, 1, 0, 0, 0, 0], 0.8) == pytest.approx(0.885714, abs=5e-7)
    assert hybrid_reduction([0.5, 1.0], 0.0) == pytest.approx(phi_reduction([0.5, 1.0])) == pytest.approx(0.75)
    assert hybrid_reduction([0.5, 0.0], 1.0) == 1.0
    with pytest.raises(DataError, match=r"found_per_category\[1\]=1.5"):
        phi_reduction([1, 1.5])
    with pytest.raises(DataError, match="empty"):
        phi_reduction([])
    with pytest.raises(ConfigError, match="recall=1.2"):
        hybrid_reduction([1], 1.2)


# ---- replacing hidden states -------------------------------------------------------------------
def test_apply_token_mask_zero_and_mean_on_tokens_and_maps():
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([[[True, False], [False, True]], [[False, False], [False, False]]])
    tokens = torch.randn(2, 1 + 4, 3, generator=g)  # one prefix token
    zero = apply_token_mask(tokens, masks, "zero", prefix_tokens=1)
    assert torch.equal(zero[:, 0], tokens[:, 0])  # the prefix token is never masked
    assert torch.equal(zero[0, [1, 4]], torch.zeros(2, 3)) and torch.equal(zero[0, [2, 3]], tokens[0, [2, 3]])
    assert torch.equal(zero[1], tokens[1])
    mean = apply_token_mask(tokens, masks, "mean", prefix_tokens=1)
    expected = tokens[0, [2, 3]].mean(0)
    assert torch.allclose(mean[0, 1], expected) and torch.allclose(mean[0, 4], expected)
    assert torch.equal(mean[1], tokens[1])
    maps = tokens[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2)  # the same grid as a channels-first map
    assert torch.equal(apply_token_mask(maps, masks, "zero"), zero[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2))
    assert torch.allclose(apply_token_mask(maps, masks, "mean"), mean[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2))
    everything = apply_token_mask(tokens[:1], torch.ones(1, 2, 2, dtype=torch.bool), "mean", prefix_tokens=1)
    assert torch.equal(everything[0, 1:], torch.zeros(4, 3))  # nothing unmasked: zero


def test_apply_token_mask_shape_errors_name_grid_size():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"17 tokens but grid_size=\(4, 4\) with prefix_tokens=0 needs 16"):
        apply_token_mask(torch.zeros(2, 17, 8), masks)
    with pytest.raises(ConfigError, match=r"\(5, 5\) feature map but grid_size=\(4, 4\)"):
        apply_token_mask(torch.zeros(2, 8, 5, 5), masks)
    with pytest.raises(DataError, match="3 images but the boxes cover 2"):
        apply_token_mask(torch.zeros(3, 16, 8), masks)


# ---- the callback in a Trainer -----------------------------------------------------------------
PATCH, SIDE, DIM = 8, 32, 6  # a 4 x 4 token grid


class Patches(nn.Module):
    """Images → patch features: a (B, D, 4, 4) map, or (B, [CLS +] 16, D) tokens."""

    def __init__(self, layout: str, cls: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.layout, self.cls = layout, cls
        self.cls_token = nn.Parameter(torch.ones(1, 1, DIM))

    def forward(self, pixels):
        features = self.proj(pixels)
        if self.layout == "map":
            return features
        tokens = features.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1) if self.cls else tokens


class ToyVision(pl.LightningModule):
    def __init__(self, layout: str = "tokens", cls: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("patches", Patches(layout, cls))
        self.head = nn.Linear(DIM, 1)
        self.seen = []

    def _features(self, batch):
        features = self.encoder(batch["pixel_values"])
        self.seen.append(features.detach().clone())
        return features

    def training_step(self, batch, batch_idx):
        return self._features(batch).mean()

    def validation_step(self, batch, batch_idx):
        self._features(batch)

    def predict_step(self, batch, batch_idx):
        return self._features(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: the unhooked rerun is the reference


BOXES = [[[0, 0, 5, 5]], [], [[20, 9, 31, 12], [0, 31, 0, 31]]]


def _loader():
    pixels = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    items = [{"pixel_values": pixels[i], "boxes": BOXES[i]} for i in range(3)]
    return DataLoader(items, batch_size=3, collate_fn=lambda rows: {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                                                                    "boxes": [r["boxes"] for r in rows]})


def _trainer(tmp_path, callback):
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), accelerator="cpu", max_steps=1, num_sanity_val_steps=0, callbacks=[callback])


def _grid_view(features, layout):
    """(B, 16, D) row-major grid tokens from either layout."""
    return features.flatten(2).transpose(1, 2) if layout == "map" else features[:, -16:]


@pytest.mark.parametrize(("layout", "mode", "cls"), [("tokens", "zero", False), ("map", "zero", False), ("tokens", "mean", True), ("map", "mean", False)])
def test_hook_masks_cells_in_fit_and_predict(tmp_path, layout, mode, cls):
    model = ToyVision(layout, cls)
    callback = VisionTokenMask("encoder.patches", grid_size=4, image_size=SIDE, radius=0, mode=mode, prefix_tokens=int(cls))
    _trainer(tmp_path, callback).fit(model, train_dataloaders=_loader())
    predicted = _trainer(tmp_path, callback).predict(model, dataloaders=_loader())[0]
    assert len(model.seen) == 2 and not callback.active and not model.encoder.patches._forward_hooks  # removed at teardown
    reference = model.encoder(next(iter(_loader()))["pixel_values"]).detach()
    masks = token_masks_from_boxes(BOXES, SIDE, 4).flatten(1)
    # image 0: cell (0, 0); image 2: cells (1, 2), (1, 3) and (3, 0)
    assert masks.sum(1).tolist() == [1, 0, 3] and bool(masks[2, 6]) and bool(masks[2, 7]) and bool(masks[2, 12])
    for seen in (model.seen[0], predicted):
        grid, ref = _grid_view(seen, layout), _grid_view(reference, layout)
        assert torch.equal(grid[~masks], ref[~masks])  # unmasked cells untouched
        if mode == "zero":
            assert torch.equal(grid[masks], torch.zeros_like(grid[masks]))
        else:
            for b in (0, 2):
                assert torch.allclose(grid[b][masks[b]], ref[b][~masks[b]].mean(0).expand(int(masks[b].sum()), -1), atol=1e-6)
        assert torch.equal(seen[1], reference[1])  # the image without boxes is unchanged
        if cls:
            assert torch.equal(seen[:, 0], reference[:, 0])


def test_stages_limit_where_masking_happens(tmp_path):
    model = ToyVision()
    callback = VisionTokenMask("encoder.patches", grid_size=4, image_size=SIDE, stages=["validate", "predict"])
    _trainer(tmp_path, callback).fit(model, train_dataloaders=_loader(), val_dataloaders=_loader())
    predicted = _trainer(tmp_path, callback).predict(model, dataloaders=_loader())[0]
    reference = model.encoder(next(iter(_loader()))["pixel_values"]).detach()
    training, validation = model.seen[:2]
    assert torch.equal(training, reference)  # training saw the images unmasked
    for masked in (validation, predicted):
        assert not torch.equal(masked, reference) and torch.equal(masked[1], reference[1])
        assert int((masked == 0).all(-1).sum()) == 4  # 1 + 3 masked cells
    # outside a batch of a masking stage the hook passes outputs through
    callback.attach(model)
    assert torch.equal(model.encoder(next(iter(_loader()))["pixel_values"]), reference)
    callback.detach()


def test_callback_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"module_name='encoder\.patchs'.*close names: encoder\.patches"):
        VisionTokenMask("encoder.patchs", grid_size=4, image_size=SIDE).attach(ToyVision())
    with pytest.raises(ConfigError, match="16 tokens but grid_size=\\(8, 8\\)"):
        _trainer(tmp_path, VisionTokenMask("encoder.patches", grid_size=8, image_size=SIDE)).fit(ToyVision(), train_dataloaders=_loader())
    with pytest.raises(ConfigError, match="17 tokens but grid_size=\\(4, 4\\) with prefix_tokens=0"):
        _trainer(tmp_path, VisionTokenMask("encoder.patches", grid_size=4, image_size=SIDE)).fit(ToyVision(cls=True), train_dataloaders=_loader())
    with pytest.raises(DataError, match="boxes_key='phi_boxes'.*no 'phi_boxes' entry"):
        _trainer(tmp_path, VisionTokenMask("encoder.patches", 4, SIDE, boxes_key="phi_boxes")).fit(ToyVision(), train_dataloaders=_loader())
    with pytest.raises(ConfigError, match="mode must be one of 'zero', 'mean'"):
        VisionTokenMask("encoder", 4, SIDE, mode="blur")
    with pytest.raises(ConfigError, match="stages must be one of"):
        VisionTokenMask("encoder", 4, SIDE, stages=["val"])
    callback = VisionTokenMask("encoder.patches", 4, SIDE)
    callback.attach(model := ToyVision())
    callback.set_boxes(BOXES[:2])
    with pytest.raises(DataError, match="ran on 3 images but the batch gives 2 box lists"):
        model.encoder(torch.zeros(3, 3, SIDE, SIDE))
    callback.detach()


# ---- the GVT composition's vision encoder ----------------------------------------------------------
@pytest.mark.parametrize(("module_name", "prefix"), [("vision_encoder", 0), ("vision_encoder.backbone.blocks.0", 1)])
def test_masking_the_vision_language_models_vision_tower(module_name, prefix):
    from tests.modules.test_vision_language import ANSWERS, QUESTIONS, gvt_model, images

    torch.manual_seed(0)
    model = gvt_model().eval()
    pixels = model.processor(images(), QUESTIONS, ANSWERS)["pixel_values"]  # (2, 3, 32, 32): a 4 x 4 grid of 8-px patches
    plain_features, plain = model.vision_encoder(pixels), model.visual_tokens(pixels)
    callback = VisionTokenMask(module_name, grid_size=4, image_size=32, radius=1, prefix_tokens=prefix)
    callback.attach(model)
    callback.set_boxes([[[12, 12, 15, 15]], []])  # cell (1, 1), dilated to rows and columns 0..2
    masked_features, masked = model.vision_encoder(pixels), model.visual_tokens(pixels)
    callback.detach()
    assert torch.equal(model.visual_tokens(pixels), plain)  # the hook is gone
    assert not torch.allclose(masked[0], plain[0], atol=1e-3)  # the boxed image's visual tokens change
    assert torch.allclose(masked[1], plain[1], atol=1e-6)  # the image without boxes does not
    cells = token_mask_from_boxes([[12, 12, 15, 15]], 32, 4, radius=1).flatten()
    assert int(cells.sum()) == 9
    if prefix == 0:  # the encoder's own output: the masked patches are zero, the rest untouched
        assert torch.equal(masked_features[0, cells], torch.zeros(9, masked_features.shape[-1]))
        assert torch.equal(masked_features[0, ~cells], plain_features[0, ~cells])
    else:  # zeroed after block 0 (the last one), then the per-token final norm: every masked patch = its bias
        assert torch.allclose(masked_features[0, cells], model.vision_encoder.backbone.norm.bias.expand(9, -1), atol=1e-6)
        assert torch.allclose(masked_features[0, ~cells], plain_features[0, ~cells], atol=1e-6)
