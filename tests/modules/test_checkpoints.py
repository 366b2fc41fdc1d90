"""Safe checkpoint loading: a checkpoint that pickles a callable is refused and the callable never runs;
real checkpoints (single files and sharded folders) still load; `trust` loads a file as it is."""

import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.utils.data import DataLoader

from lightning_tokens import TokenLM
from lightning_tokens.core.errors import LightningTokensError, UntrustedCheckpointError
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from lightning_tokens.modules.checkpoints import (
    check_sharded_metadata,
    consolidated_state_dict,
    load_checkpoint_file,
)
from tests.distributed_worker import TINY, collate, examples


def leave_a_mark(path):
    """What a malicious pickle would call: here it only creates a file, so a test can see it ran."""
    Path(path).touch()
    return "ran"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (leave_a_mark, (self.marker,))


def _malicious_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": _Payload(marker)}}, path)
    return path, marker


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    for load in (lambda: consolidated_state_dict(path), lambda: load_checkpoint_file(path)):
        with pytest.raises(UntrustedCheckpointError, match=r"leave_a_mark.*--trust_checkpoint true") as caught:
            load()
        assert isinstance(caught.value, LightningTokensError) and str(path) in str(caught.value)
    assert not marker.exists()
    # the user's opt-in loads the file as it is (and so runs what it holds)
    assert consolidated_state_dict(path, trust=True)["hyper_parameters"]["lr"] == "ran"
    assert marker.exists()


def test_a_real_training_checkpoint_loads_safely(tmp_path):
    """What Lightning writes for TokenLM (settings dataclasses in the hyper-parameters, optimizer and
    scheduler states, loops) is within the allowlist."""
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(r=4),
                    optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(examples(len(model.tokenizer)), batch_size=4, collate_fn=collate))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = consolidated_state_dict(path)
    assert isinstance(checkpoint["hyper_parameters"]["lora"], LoRASettings)
    torch.testing.assert_close(checkpoint["state_dict"], {k: v.cpu() for k, v in model.state_dict().items()})


def _sharded_folder(tmp_path):
    folder = tmp_path / "sharded"
    dcp.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}}, checkpoint_id=folder)
    torch.save({"global_step": 3, "hyper_parameters": {}}, folder / "meta.pt")
    return folder


def test_a_sharded_folder_is_checked_before_torch_unpickles_its_metadata(tmp_path):
    folder = _sharded_folder(tmp_path)
    check_sharded_metadata(folder)  # what dcp writes passes
    checkpoint = consolidated_state_dict(folder)
    assert checkpoint["global_step"] == 3 and torch.equal(checkpoint["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))

    marker = tmp_path / "marker"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    for check in (lambda: check_sharded_metadata(folder), lambda: consolidated_state_dict(folder)):
        with pytest.raises(UntrustedCheckpointError, match=r"\.metadata.*leave_a_mark"):
            check()
    assert not marker.exists()


def test_a_sharded_folder_with_a_malicious_meta_file_is_refused(tmp_path):
    folder = _sharded_folder(tmp_path)
    marker = tmp_path / "marker"
    torch.save({"global_step": _Payload(marker)}, folder / "meta.pt")
    with pytest.raises(UntrustedCheckpointError, match="meta.pt"):
        consolidated_state_dict(folder)
    assert not marker.exists()
