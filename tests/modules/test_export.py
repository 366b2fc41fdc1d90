"""``export``: a LoRA run's checkpoint becomes a peft adapter folder whose model equals the trained one."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tokens import TokenLM
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from lightning_tokens.modules.checkpoints import consolidated_state_dict, export_checkpoint
from tests.distributed_worker import TINY, collate, examples


def _lm():
    torch.manual_seed(0)
    return TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(r=4),
                   optimizer=OptimizerSettings(lr=1e-2, warmup=0))


def test_lora_checkpoint_exports_a_peft_adapter(tmp_path):
    from peft import PeftModel

    lm = _lm()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(lm, DataLoader(examples(len(lm.tokenizer)), batch_size=4, collate_fn=collate))
    ckpt = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(ckpt)

    out = export_checkpoint(_lm(), ckpt, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    torch.manual_seed(0)  # the same random init as the trained run's frozen base
    base = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    base.configure_model()
    loaded = PeftModel.from_pretrained(base.model, out)
    ids = torch.randint(4, len(lm.tokenizer), (2, 9))
    with torch.no_grad():
        expected = lm.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with loaded.disable_adapter(), torch.no_grad():
        assert (loaded(input_ids=ids).logits - expected).abs().max() > 1e-4  # the adapter carries the training


def test_export_refuses_a_mismatched_config(tmp_path):
    lm = _lm()
    ckpt = tmp_path / "w.ckpt"
    lm.configure_model()
    torch.save({"state_dict": lm.state_dict()}, ckpt)
    other = TokenLM(model="tiny-llama", tokenizer="char", model_config={**TINY, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="does not match the configured model"):
        export_checkpoint(other, str(ckpt), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="format='zip'"):
        export_checkpoint(other, str(ckpt), str(tmp_path / "out"), format="zip")
    assert consolidated_state_dict(ckpt)["state_dict"].keys() == lm.state_dict().keys()
