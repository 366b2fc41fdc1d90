"""Two CPU processes (gloo), launched with torchrun: DDP and FSDP2 (``ModelParallelStrategy``) runs of a tiny
GVT composition (language model and connector trained, vision tower frozen) and of a tiny Qwen2-VL follow one
process on the same global batch, FSDP2 manages every parameter (connector and vision tower included), and
resuming from the sharded checkpoint is exact. The worker is ``tests/vlm_distributed_worker.py``."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import launch_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "vlm_distributed_worker.py")
LOSS_ATOL = 1e-5
# Adam turns float32 rounding differences of near-zero gradients into visible weight differences (as in
# tests/core/test_multiprocess.py). Measured after 3 steps: max |Δw| 8e-7 (LM), 5.6e-5 (connector), while
# training moves the connector by > 1e-2.
WEIGHT_ATOL = 2e-4
STEPS = 3


def _launch(strategies: str, out: str) -> None:
    launch_worker(WORKER, ["--strategies", strategies, "--out", out], distributed=strategies != "single")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """``{"gvt": {strategy: result}, "hf": {strategy: result}}`` (see the worker for a result's fields)."""
    out = str(tmp_path_factory.mktemp("vlm_multiprocess"))
    _launch("single", out)
    _launch("ddp,fsdp2", out)
    strategies = ("single", "ddp", "fsdp2")
    return {
        kind: {s: torch.load(os.path.join(out, f"vlm_{kind}_{s}.pt"), weights_only=False) for s in strategies}
        for kind in ("gvt", "hf")
    }


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str, skip: str | None = None) -> float:
    keys = [k for k in a if k.startswith(prefix) and (skip is None or skip not in k)]
    assert keys and a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_gvt_two_processes_follow_one_process_on_the_global_batch(runs, strategy):
    runs = runs["gvt"]
    single_losses, single_weights, _ = runs["single"]["full"]
    losses, weights, _ = runs[strategy]["full"]
    assert len(losses) == len(single_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=0, atol=LOSS_ATOL)
    initial = runs["single"]["initial"]
    assert _max_diff(single_weights, initial, "connector.") > 1e-2  # the connector trained...
    assert _max_diff(single_weights, initial, "model.") > 1e-2  # ...and the language model
    assert _max_diff(weights, single_weights, "connector.") < WEIGHT_ATOL
    assert _max_diff(weights, single_weights, "model.") < WEIGHT_ATOL
    # the frozen vision tower is gathered, used and left as it was
    assert _max_diff(weights, initial, "vision_encoder.") == 0.0


@pytest.mark.slow
def test_gvt_fsdp2_shards_every_parameter_with_vision_blocks_and_connector_as_units(runs):
    runs = runs["gvt"]
    layout = runs["fsdp2"]["full"][2]
    assert layout["plain_parameters"] == []  # connector and vision tower parameters are DTensors too
    assert layout["units"] == [
        "",  # the LightningModule: the root
        "connector.resampler.layers.0.0",  # the resampler's attention...
        "connector.resampler.layers.0.1",  # ...and feed-forward
        "model.model.layers.0",
        "model.model.layers.1",
        "vision_encoder.backbone.blocks.0",
        "vision_encoder.backbone.blocks.1",
    ]
    assert runs["single"]["full"][2]["units"] == []


@pytest.mark.slow
def test_gvt_fsdp2_resume_from_sharded_checkpoint_is_exact(runs):
    result = runs["gvt"]["fsdp2"]
    full_losses, full_weights, _ = result["full"]
    resumed_losses, resumed_weights = result["resumed"]
    assert result["sharded_checkpoint"]  # a folder of shards
    assert resumed_losses == full_losses
    assert _max_diff(resumed_weights, full_weights, "") == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_hf_vlm_two_processes_follow_one_process(runs, strategy):
    """Qwen2-VL with its language model trained: FSDP2 units are its decoder layers and vision blocks."""
    runs = runs["hf"]
    single_losses, single_weights, _ = runs["single"]["full"]
    losses, weights, layout = runs[strategy]["full"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=0, atol=LOSS_ATOL)
    initial = runs["single"]["initial"]
    assert _max_diff(single_weights, initial, "model.model.language_model.") > 1e-2
    assert _max_diff(weights, single_weights, "model.") < WEIGHT_ATOL
    assert _max_diff(weights, initial, "model.model.visual.", skip="merger") == 0.0  # the frozen tower
    if strategy == "fsdp2":
        assert layout["plain_parameters"] == []
        assert layout["units"] == [
            "", "model.model.language_model.layers.0", "model.model.language_model.layers.1", "model.model.visual.blocks.0"
        ]


def test_vision_blocks_are_the_repeated_blocks_of_each_backbone_layout():
    from lightning_tokens.layers.resampler import PerceiverResampler
    from lightning_tokens.models.vision import build_vision_encoder
    from lightning_tokens.modules.sharding import resampler_blocks, vision_blocks

    mobilenet = build_vision_encoder("mobilenet_v2", pretrained=False, image_size=32)
    blocks = vision_blocks(mobilenet)
    assert len(blocks) == 19 and all(a is b for a, b in zip(blocks, mobilenet.backbone))  # features' children
    vit = build_vision_encoder("vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 8, "depth": 3})
    assert vision_blocks(vit) == list(vit.backbone.blocks)
    resnet = build_vision_encoder("resnet18", pretrained=False, image_size=32)
    assert vision_blocks(resnet) == []  # unknown layout: the whole tower stays in the root unit
    resampler = PerceiverResampler(dim=8, depth=2, heads=2, dim_head=4, num_latents=3)
    units = resampler_blocks(resampler)
    assert [type(u).__name__ for u in units] == ["PerceiverAttention", "Sequential"] * 2
    assert sum(p.numel() for u in units for p in u.parameters()) + resampler.latents.numel() + sum(
        p.numel() for p in resampler.norm.parameters()
    ) == sum(p.numel() for p in resampler.parameters())  # every other parameter is in a unit
