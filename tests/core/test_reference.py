"""Each reference mode gives the per-token losses computed by hand with the same weights."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import DFT, ExcessLossSelection, NUPADataModule, TokenLM
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.core.reference_scores import load_reference_scores, lookup_reference_nll, score_reference
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _data(**kw):
    return NUPADataModule(**{**dict(tasks="Integer/add", tokenizer="char", num_train=32, num_val=4, num_test=4, batch_size=8, max_length=48), **kw})


def _model(**kw):
    return TokenLM(**{**dict(model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=1e-2, warmup=0)), **kw})


def _batch():
    dm = _data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def per_token_nll(causal_lm, batch):
    """By hand: full logits from the HF model, shifted cross-entropy, aligned to label positions."""
    logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    nll = torch.zeros(labels.shape, dtype=torch.float64)
    valid = labels[:, 1:] != -100
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    nll[:, 1:] = ce * valid
    return nll


def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_adapter_disabled_is_the_base_model():
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    model.configure_model()
    _perturb_adapters(model)
    batch = _batch()
    ref = model.reference.stats(batch, model)
    with model.model.disable_adapter():
        expected = per_token_nll(model.causal_lm, batch)
    torch.testing.assert_close(ref.nll.double(), expected, rtol=1e-5, atol=1e-6)
    # and it differs from the adapted model
    assert not torch.allclose(per_token_nll(model.causal_lm, batch), expected, atol=1e-3)


def test_separate_model_is_frozen_and_matches_by_hand():
    model = _model(reference=ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY))
    model.configure_model()
    assert all(not p.requires_grad for p in model.reference_model.parameters())
    batch = _batch()
    torch.testing.assert_close(
        model.reference.stats(batch, model).nll.double(), per_token_nll(model.reference_model, batch), rtol=1e-5, atol=1e-6
    )


def test_ema_update_formula_and_statistics():
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="ema", ema_alpha=0.25, ema_every=2))
    model.configure_model()
    provider = model.reference
    start = {k: v.clone() for k, v in provider.average.items()}
    _perturb_adapters(model)
    live = {n: p.detach().clone() for n, p in model.model.named_parameters() if p.requires_grad}
    provider.on_optimizer_step(model)  # step 1: not an update step (every 2)
    assert all(torch.equal(provider.average[k], start[k]) for k in start)
    provider.on_optimizer_step(model)  # step 2: target <- 0.75 target + 0.25 current
    for k in start:
        torch.testing.assert_close(provider.average[k], 0.75 * start[k] + 0.25 * live[k])
    batch = _batch()
    ref = provider.stats(batch, model)
    # by hand: load the averaged values into the model, compute, restore
    with torch.no_grad():
        params = dict(model.model.named_parameters())
        for k, v in provider.average.items():
            params[k].copy_(v)
        expected = per_token_nll(model.causal_lm, batch)
        for k, v in live.items():
            params[k].copy_(v)
    torch.testing.assert_close(ref.nll.double(), expected, rtol=1e-5, atol=1e-6)
    for n, p in model.model.named_parameters():  # the live weights are back
        if n in live:
            assert torch.equal(p, live[n])


def test_ema_survives_a_checkpoint_round_trip_exactly(tmp_path):
    settings = ReferenceSettings(mode="ema", ema_alpha=0.3)
    pl.seed_everything(0)
    straight = _model(lora=LoRASettings(r=4), reference=settings)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    pl.Trainer(max_steps=6, callbacks=[ExcessLossSelection(), ckpt], **common).fit(straight, datamodule=_data())
    resumed = _model(lora=LoRASettings(r=4), reference=settings)
    pl.Trainer(max_steps=6, enable_checkpointing=False, callbacks=[ExcessLossSelection()], **common).fit(
        resumed, datamodule=_data(), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt")
    )
    assert straight.reference.steps == resumed.reference.steps == 6
    for k, v in straight.reference.average.items():
        assert torch.equal(resumed.reference.average[k], v), k


def test_offline_scores_round_trip_and_errors(tmp_path):
    scorer = _model()
    path = str(tmp_path / "ref.safetensors")
    score_reference(scorer, _data(), path)
    scores = load_reference_scores(path)
    assert len(scores) == 32
    batch = _batch()
    looked_up = lookup_reference_nll(scores, batch, path)
    torch.testing.assert_close(looked_up.double(), per_token_nll(scorer.causal_lm, batch), rtol=1e-5, atol=1e-6)

    model = _model(reference=ReferenceSettings(mode="offline", scores_file=path))
    model.configure_model()
    torch.testing.assert_close(model.reference.stats(batch, model).nll, looked_up)
    missing = dict(batch, example_id=batch["example_id"] + 1000)
    with pytest.raises(ValueError, match="has no reference scores"):
        lookup_reference_nll(scores, missing, path)
    short = dict(batch, attention_mask=batch["attention_mask"].clone())
    short["attention_mask"][0, short["attention_mask"][0].sum() - 1] = 0
    with pytest.raises(ValueError, match="re-run `lightning-tokens score`"):
        lookup_reference_nll(scores, short, path)


def test_configuration_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs LoRA"):
        _model(reference=ReferenceSettings(mode="adapter_disabled"))
    with pytest.raises(ValueError, match="reference.model"):
        _model(reference=ReferenceSettings(mode="model"))
    with pytest.raises(ValueError, match="does not exist"):
        _model(reference=ReferenceSettings(mode="offline", scores_file=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="needs a reference model"):
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[ExcessLossSelection()]).fit(_model(), datamodule=_data())


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_rho1_training_gradient_equals_the_slm_loss_by_hand(scope):
    pl.seed_everything(0)
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"), optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    model.configure_model()
    _perturb_adapters(model)
    batch = _batch()
    # by hand, float64: keep the top 60% by excess loss, mean NLL over kept tokens, plus DFT weights
    nll = per_token_nll(model.causal_lm, batch)
    with torch.no_grad(), model.model.disable_adapter():
        ref = per_token_nll(model.causal_lm, batch)
    mask = batch["labels"] != -100
    mask[:, 0] = False
    from tests.callbacks.test_rho1 import naive_select

    keep = naive_select(nll.detach(), ref, mask, 0.6, scope).bool()
    loss = (torch.exp(-nll.detach()) * nll)[keep].sum() / keep.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(loss, params)

    grads = {}

    class Grab(pl.Callback):  # one micro-batch on one process: the rescale factor is exactly 1
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({id(p): p.grad.clone() for p in params})

    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, callbacks=[DFT(), ExcessLossSelection(ratio=0.6, scope=scope), Grab()],
    )
    trainer.fit(model, datamodule=_data())
    for p, e in zip(params, expected):
        torch.testing.assert_close(grads[id(p)].double(), e.double(), rtol=1e-4, atol=1e-7)


class _PlainHost(torch.nn.Module):
    """Not a TokenLM: only what `ReferenceHost` asks for, around a Hugging Face causal LM (with LoRA)."""

    def __init__(self, vocab_size):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        from lightning_tokens.models.presets import load_causal_lm

        self.vocab_size = vocab_size
        base = load_causal_lm("tiny-llama", vocab_size=vocab_size, overrides=TINY)
        self.model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
        self.reference_model = None
        self.token_loss_backend = "torch"

    def hidden_states(self, batch, causal_lm=None):
        lm = causal_lm if causal_lm is not None else self.model.get_base_model()
        return lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def output_head(self):
        from lightning_tokens.core.stats import OutputHead

        return OutputHead.from_module(self.model.get_base_model().get_output_embeddings())

    def load_frozen_causal_lm(self, name, overrides=None, quantization=None):
        from lightning_tokens.models.presets import load_causal_lm

        return load_causal_lm(name, vocab_size=self.vocab_size, overrides=overrides).eval().requires_grad_(False)

    @property
    def strategy(self):
        return None


def test_every_provider_serves_a_module_that_is_not_a_token_lm():
    """Core talks to modules only through `ReferenceHost`: a plain module that implements it gets the same
    reference statistics by hand as TokenLM does (adapter_disabled, model, ema)."""
    from lightning_tokens.core.reference import ReferenceHost, build_reference

    batch = _batch()
    host = _PlainHost(vocab_size=len(_model().tokenizer))
    assert isinstance(host, ReferenceHost) and isinstance(_model(), ReferenceHost)
    _perturb_adapters(host.model)

    disabled = build_reference(ReferenceSettings(mode="adapter_disabled"))
    with host.model.disable_adapter():
        expected = per_token_nll(host.model.get_base_model(), batch)
    torch.testing.assert_close(disabled.stats(batch, host).nll.double(), expected, rtol=1e-5, atol=1e-6)

    separate = build_reference(ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY))
    separate.setup(host)
    assert all(not p.requires_grad for p in host.reference_model.parameters())
    torch.testing.assert_close(
        separate.stats(batch, host).nll.double(), per_token_nll(host.reference_model, batch), rtol=1e-5, atol=1e-6
    )

    ema = build_reference(ReferenceSettings(mode="ema", ema_alpha=1.0))
    ema.setup(host)  # averages = the perturbed adapters
    history = per_token_nll(host.model.get_base_model(), batch)
    with torch.no_grad():
        for name, p in host.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    torch.testing.assert_close(ema.stats(batch, host).nll.double(), history, rtol=1e-5, atol=1e-6)
    assert all(torch.count_nonzero(p) == 0 for n, p in host.model.named_parameters() if "lora_B" in n)  # swapped back
