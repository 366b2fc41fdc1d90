"""VisionLanguageGRPO: images ride along with the rollouts, and the training rows score the sampled tokens
exactly as the sampler saw them (GVT composition and Qwen2-VL)."""

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules.vision_language import ResamplerSettings, VisionSettings
from lightning_tokens.modules.vision_language_grpo import VisionLanguageGRPO
from lightning_tokens.modules.visual_inputs import repeat_image_inputs
from lightning_tokens.rewards import RewardSpec

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
TINY_VIT = VisionSettings(name="vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 8, "depth": 1})
TINY_RESAMPLER = ResamplerSettings(num_latents=4, depth=1, heads=2, dim_head=16)
REWARD = [RewardSpec("lightning_tokens.rewards.FormatReward", kwargs={"pattern": "a"})]
QUESTIONS = ["How many circles are there?", "Red?"]  # different lengths: left padding is exercised


def images() -> list[Image.Image]:
    return [Image.new("RGB", (24, 40), (255, 0, 0)), Image.new("RGB", (40, 24), (0, 0, 255))]


def build(model: str, **kwargs) -> VisionLanguageGRPO:
    options = dict(model=model, rewards=REWARD, num_generations=3, max_completion_length=5, rollout_seed=7)
    if model == "tiny-llama":
        options |= dict(tokenizer="char", model_config=TINY_LM, vision=TINY_VIT, resampler=TINY_RESAMPLER)
    module = VisionLanguageGRPO(**{**options, **kwargs})
    module.configure_model()
    return module


def prompt_batch(module: VisionLanguageGRPO) -> dict:
    batch = module.processor(images(), QUESTIONS)
    batch["prompts"] = QUESTIONS
    return batch


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-vl"])
def test_rollout_rows_score_what_the_sampler_sampled(name):
    torch.manual_seed(0)
    module = build(name)
    batch = prompt_batch(module)
    rollout = module.rollout(batch)
    rows = rollout.batch
    assert rows["input_ids"].shape[0] == 6
    if name == "tiny-llama":
        assert rows["pixel_values"].shape[0] == 6
        assert torch.equal(rows["pixel_values"][1], batch["pixel_values"][0])
        assert torch.equal(rows["pixel_values"][3], batch["pixel_values"][1])
    else:
        assert torch.equal(rows["image_grid_thw"], batch["image_grid_thw"].repeat_interleave(3, 0))
        assert rows["mm_token_type_ids"].shape == rows["input_ids"].shape
        image_id = module.causal_lm.config.image_token_id
        prompt_part = rows["labels"] == -100  # a random model may also sample the image token id
        assert torch.equal(rows["mm_token_type_ids"].bool() & prompt_part, (rows["input_ids"] == image_id) & prompt_part)
        assert not rows["mm_token_type_ids"][~prompt_part].any()
    # the log-probabilities of the completions under the training rows equal the sampler's own scores
    repeated = module.repeat_prompts(batch, 3)
    module.eval()
    with torch.no_grad():
        prompt = repeated["prompt_input_ids"]
        if name == "tiny-llama":
            embeds = module.input_embeddings(prompt, repeated["pixel_values"])
            out = module.causal_lm.generate(inputs_embeds=embeds, attention_mask=repeated["prompt_attention_mask"],
                                            do_sample=False, max_new_tokens=5, output_logits=True,
                                            return_dict_in_generate=True, pad_token_id=module.tokenizer.pad_token_id)
            new = out.sequences
        else:
            extra = {k: repeated[k] for k in ("pixel_values", "image_grid_thw")}
            out = module.causal_lm.generate(input_ids=prompt, attention_mask=repeated["prompt_attention_mask"],
                                            mm_token_type_ids=repeated["prompt_mm_token_type_ids"], **extra,
                                            do_sample=False, max_new_tokens=5, output_logits=True,
                                            return_dict_in_generate=True, pad_token_id=module.tokenizer.pad_token_id)
            new = out.sequences[:, prompt.shape[1]:]
        sampled_logp = torch.stack(
            [torch.log_softmax(step.double(), -1).gather(1, new[:, i : i + 1]).squeeze(1) for i, step in enumerate(out.logits)], 1
        )
        from lightning_tokens.rl.rollout import rollout_rows

        greedy = rollout_rows(prompt, repeated["prompt_attention_mask"], new, None, module.tokenizer.pad_token_id)
        train = {"input_ids": greedy.input_ids, "attention_mask": greedy.attention_mask, "labels": greedy.labels}
        train |= module.rollout_inputs(batch, 3, greedy.input_ids, repeated["prompt_attention_mask"])
        trained_logp = -module._stats(train, with_entropy=False).nll.double()
    for row in range(6):
        positions = greedy.labels[row] != -100
        torch.testing.assert_close(trained_logp[row][positions], sampled_logp[row], atol=2e-4, rtol=0)


def test_rollout_images_differ_per_prompt_and_change_the_scores():
    torch.manual_seed(0)
    module = build("tiny-llama")
    batch = prompt_batch(module)
    rows = module.rollout(batch).batch
    nll = module._stats(rows, with_entropy=False).nll
    swapped = dict(rows, pixel_values=rows["pixel_values"].flip(0))
    other = module._stats(swapped, with_entropy=False).nll
    assert not torch.allclose(nll[rows["labels"] != -100], other[rows["labels"] != -100])


def test_fit_steps_on_visual_qa_and_logs_rewards(tmp_path):
    from lightning_tokens.datamodules.visual_qa import VisualQADataModule

    module = build("tiny-llama", num_generations=2)
    data = VisualQADataModule(tasks="mci", num_train=4, num_val=2, num_test=2, batch_size=2, eval_batch_size=2,
                              image_size=48, seed=0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert "train/reward" in trainer.callback_metrics
    assert module.rollouts_done == 2


def test_vllm_backend_is_refused():
    module = build("tiny-llama", generation_backend="vllm")
    with pytest.raises(ConfigError, match="generation_backend: hf"):
        module.build_rollout_engine()


def test_repeat_image_inputs_keeps_each_images_patches_together():
    grid = torch.tensor([[1, 2, 2], [1, 1, 2]])
    pixels = torch.arange(6.0).unsqueeze(1)  # 4 patches of image 0, 2 of image 1
    out = repeat_image_inputs({"pixel_values": pixels, "image_grid_thw": grid}, 2)
    assert out["pixel_values"].flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 4, 5]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 1, 2], [1, 1, 2]]
    gvt = repeat_image_inputs({"pixel_values": torch.randn(2, 3, 4, 4)}, 3)
    assert torch.equal(gvt["pixel_values"][2], gvt["pixel_values"][0])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-vl"])
def test_sampling_never_emits_image_tokens(name):
    module = build(name)
    banned = module.image_token_ids()
    assert len(banned) >= (3 if name == "tiny-llama" else 2)
    head = module.causal_lm.get_output_embeddings()
    with torch.no_grad():  # make an image token the policy's favourite
        head.weight[banned[0]] = 50 * head.weight.abs().max() * torch.sign(torch.randn_like(head.weight[banned[0]]))
    _, _, completions = module.sample(prompt_batch(module))
    assert not torch.isin(completions, torch.tensor(banned)).any()
