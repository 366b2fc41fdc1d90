"""External rollout engines: the weight sync (LoRA merged, plain names) and GRPO with a stand-in engine that,
like vLLM in colocate mode, keeps its own copy of the weights."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import GRPO, NUPADataModule, RewardSpec
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from lightning_tokens.modules.rollout_engines import VLLMEngine, policy_weights

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _lora_model(**kwargs):
    model = GRPO(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(r=4), num_generations=2,
                 max_completion_length=4, loss_backend="torch", rewards=[RewardSpec("tests.modules.test_grpo.digit_share")],
                 optimizer=OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0), **kwargs)
    return model


def test_policy_weights_are_the_merged_model_under_plain_names():
    model = _lora_model()
    model.configure_model()
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: merged weights differ from the base
    ids = torch.randint(0, 40, (1, 6))
    before = model.causal_lm(input_ids=ids).logits
    synced = {name: t.clone() for name, t in policy_weights(model.model)}
    merged = copy.deepcopy(model.model).merge_and_unload()
    assert synced.keys() == merged.state_dict().keys()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(synced[name], tensor, msg=name)
    torch.testing.assert_close(model.causal_lm(input_ids=ids).logits, before)  # unmerged again
    base_q = model.causal_lm.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(synced["model.layers.0.self_attn.q_proj.weight"], base_q)  # the adapter is in the copy


class StandInEngine:
    """Generates with its own copy of the architecture (random weights until the first sync)."""

    def __init__(self, template, tokenizer):
        self.model = copy.deepcopy(template).eval()
        for p in self.model.parameters():
            p.data.normal_()
        self.tokenizer, self.loads = tokenizer, 0

    def load_weights(self, weights):
        state = dict(weights)
        missing = self.model.load_state_dict(state, strict=True)
        assert not missing.missing_keys
        self.loads += 1

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature, top_p, top_k, seeds):
        out = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            ids = torch.tensor([prompt] * n)
            generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                            temperature=temperature, max_new_tokens=max_new_tokens,
                                            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            out += [row[len(prompt):].tolist() for row in generated]
        return out


class EngineGRPO(GRPO):
    def build_rollout_engine(self):
        self.engine_built = StandInEngine(copy.deepcopy(self.model).merge_and_unload(), self.tokenizer)
        return self.engine_built


def test_grpo_syncs_the_engine_before_every_rollout_after_an_update(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = EngineGRPO(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(r=4), num_generations=2,
                       max_completion_length=4, loss_backend="torch", rewards=[RewardSpec("tests.modules.test_grpo.digit_share")],
                       optimizer=OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0), generation_backend="vllm")
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=16, num_val=2, num_test=2, batch_size=2, train_format="prompts")
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    engine = model.engine_built
    assert engine.loads == 3  # before the first rollout, then after each of the two updates that preceded one
    assert model._engine_stale  # the third update happened after the last rollout
    expected = {n: t.clone() for n, t in policy_weights(model.model)}  # the policy after the third update
    engine_weights = engine.model.state_dict()  # what the third rollout sampled with: before that update
    assert engine_weights.keys() == expected.keys()
    assert any(not torch.equal(engine_weights[n], expected[n]) for n in expected)
    engine.load_weights(policy_weights(model.model))
    for name, tensor in expected.items():
        torch.testing.assert_close(engine.model.state_dict()[name], tensor, msg=name)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_backend_refuses_the_cpu_early():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        VLLMEngine("tiny-llama")
    with pytest.raises(ConfigError, match="generation_backend='sglang'"):
        _lora_model(generation_backend="sglang")
