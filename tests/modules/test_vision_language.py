"""VisionLanguageLM: splicing, labels, the fused loss against the Hugging Face models' own loss, errors."""

import pytest
import torch
from PIL import Image

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.layers import PerceiverResampler
from lightning_tokens.modules.vision_language import ResamplerSettings, VisionLanguageLM, VisionSettings
from lightning_tokens.modules.visual_inputs import IMAGE_END, IMAGE_START, splice_visual_tokens

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
TINY_VIT = VisionSettings(name="vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 8, "depth": 1})
TINY_RESAMPLER = ResamplerSettings(num_latents=4, depth=1, heads=2, dim_head=16)


def gvt_model(**kwargs) -> VisionLanguageLM:
    options = dict(model="tiny-llama", tokenizer="char", model_config=TINY_LM, vision=TINY_VIT, resampler=TINY_RESAMPLER)
    model = VisionLanguageLM(**{**options, **kwargs})
    model.configure_model()
    return model


def images(n: int = 2) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    return [Image.new("RGB", (20 + 10 * i, 40), colours[i % 3]) for i in range(n)]


QUESTIONS, ANSWERS = ["How many circles?", "Is it red?"], ["3", "Yes."]


def test_resampler_shapes_and_latents_attend_to_media():
    resampler = PerceiverResampler(dim=16, depth=2, heads=2, dim_head=8, num_latents=5)
    media = torch.randn(3, 7, 16)
    out = resampler(media)
    assert out.shape == (3, 5, 16)
    changed = media.clone()
    changed[1] = torch.randn(7, 16)
    again = resampler(changed)
    assert torch.equal(again[0], out[0]) and not torch.allclose(again[1], out[1])  # per-sample, media-dependent
    assert resampler(torch.randn(2, 49, 16)).shape == (2, 5, 16)  # any number of media features


def test_splice_matches_hand_built_inputs_embeds():
    embeds = torch.randn(2, 6, 3)
    ids = torch.tensor([[1, 9, 9, 2, 5, 5], [9, 9, 4, 4, 4, 0]])
    visual = torch.randn(2, 2, 3)
    spliced = splice_visual_tokens(embeds, ids, 9, visual)
    expected = embeds.clone()
    expected[0, 1], expected[0, 2] = visual[0, 0], visual[0, 1]
    expected[1, 0], expected[1, 1] = visual[1, 0], visual[1, 1]
    assert torch.equal(spliced, expected)


def test_processor_labels_cover_only_the_answer():
    model = gvt_model()
    tok = model.tokenizer
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    for row in range(2):
        labels = batch["labels"][row]
        assert tok.decode(labels[labels >= 0]) == ANSWERS[row] + tok.eos_token
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        text = tok.decode(ids)
        assert text.startswith(IMAGE_START) and IMAGE_END + QUESTIONS[row] in text
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
        assert torch.equal(ids[: len(prompt)], prompt)  # the generation prompt is the training prefix
        assert (labels[: len(prompt)] == -100).all()
    assert int((batch["input_ids"] == model.processor.placeholder_id).sum()) == 2 * TINY_RESAMPLER.num_latents
    assert batch["prompt_attention_mask"][:, -1].all()  # left-padded prompts


def test_hidden_states_put_visual_tokens_at_placeholders():
    model = gvt_model()
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    visual = model.visual_tokens(batch["pixel_values"])
    embeds = model.causal_lm.get_input_embeddings()(batch["input_ids"]).clone()
    positions = (batch["input_ids"] == model.processor.placeholder_id).nonzero()
    for k, (row, col) in enumerate(positions.tolist()):
        embeds[row, col] = visual[row, k % TINY_RESAMPLER.num_latents]
    expected = model.causal_lm.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(model.hidden_states(batch), expected, atol=1e-6)
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    assert not torch.allclose(model.hidden_states(other), expected)  # the images matter


def _float64_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    assert logits.dtype == torch.float64
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_gvt_fused_loss_equals_the_language_models_own_loss_float64():
    model = gvt_model().double()
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    batch["pixel_values"] = batch["pixel_values"].double()
    ours = model._loss(batch)
    embeds = model.input_embeddings(batch["input_ids"], batch["pixel_values"])
    out = model.causal_lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert abs(float(ours) - float(_float64_loss(out.logits, batch["labels"]))) < 1e-6
    assert abs(float(ours) - float(out.loss)) < 1e-5  # the model's own loss (it casts logits to float32)


#: The tiny Hugging Face presets and the module that maps their vision features to the language model.
HF_PRESETS = {"tiny-qwen2-vl": ".merger.", "tiny-llava": ".multi_modal_projector.", "tiny-idefics3": ".connector."}
_HF_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_attention_mask")


@pytest.mark.parametrize("name", list(HF_PRESETS))
def test_hf_vlm_fused_loss_equals_the_models_own_loss_float64(name):
    model = VisionLanguageLM(model=name)
    model.configure_model()
    model.double()
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    batch["pixel_values"] = batch["pixel_values"].double()
    tok = model.tokenizer
    for row in range(2):
        labels = batch["labels"][row]
        assert tok.decode(labels[labels >= 0]) == ANSWERS[row] + tok.eos_token
    assert not torch.isin(batch["labels"], torch.tensor(model.image_token_ids())).any()
    ours = model._loss(batch)
    out = model.causal_lm(**{k: batch[k] for k in _HF_INPUTS if k in batch}, labels=batch["labels"])
    assert abs(float(ours) - float(_float64_loss(out.logits, batch["labels"]))) < 1e-6
    assert abs(float(ours) - float(out.loss)) < 1e-5  # the model's own loss (it casts logits to float32)
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    assert abs(float(model._loss(other)) - float(ours)) > 1e-6  # the images reach the loss
    ours.backward()
    projector = [p for n, p in model.named_parameters() if HF_PRESETS[name] in n]
    assert projector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)


@pytest.mark.parametrize("name", list(HF_PRESETS))
def test_hf_vlm_trains_only_the_projector_and_generates(name):
    model = VisionLanguageLM(model=name, max_new_tokens=3)
    model.configure_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(HF_PRESETS[name] in n for n in trainable)
    batch = model.processor(images(), QUESTIONS)
    assert "labels" not in batch and batch["prompt_attention_mask"][:, -1].all()  # left-padded prompts
    texts = model.generate(batch)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
    new = model.generate_ids(batch, max_new_tokens=3, do_sample=False)
    assert new.shape[0] == 2 and not torch.isin(new, torch.tensor(model.image_token_ids())).any()


def test_tiny_llava_and_idefics3_expand_each_image_into_the_models_image_tokens():
    llava = VisionLanguageLM(model="tiny-llava")
    llava.configure_model()
    batch = llava.processor(images(), QUESTIONS, ANSWERS)
    image_id = llava.causal_lm.config.image_token_id
    # (32 px / 8 px)² patch features per image, the CLS feature dropped
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [16, 16] == [llava.causal_lm.config.image_seq_length] * 2
    assert batch["pixel_values"].shape == (2, 3, 32, 32)

    idefics3 = VisionLanguageLM(model="tiny-idefics3")
    idefics3.configure_model()
    batch = idefics3.processor(images(), QUESTIONS, ANSWERS)
    tok = idefics3.tokenizer
    prompt = tok.decode(batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()])
    # 16 patches pixel-shuffled 2×2 into 4 image tokens, between the image delimiters
    assert "<fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image>" + QUESTIONS[0] in prompt
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32) and batch["pixel_attention_mask"].shape == (2, 1, 32, 32)
    ids = tok.convert_tokens_to_ids(["<image>", "<fake_token_around_image>", "<global-img>"])
    assert idefics3.image_token_ids() == sorted(ids)  # never generated


def test_tiny_presets_reject_overrides_that_break_their_image_tokens():
    with pytest.raises(ConfigError, match="vision_config.patch_size"):
        VisionLanguageLM(model="tiny-llava", model_config={"vision_config": {"patch_size": 16}}).configure_model()
    with pytest.raises(ConfigError, match="scale_factor"):
        VisionLanguageLM(model="tiny-idefics3", model_config={"scale_factor": 4}).configure_model()
    model = VisionLanguageLM(model="tiny-idefics3", model_config={"text_config": {"num_hidden_layers": 1}})
    model.configure_model()
    assert model.causal_lm.config.text_config.num_hidden_layers == 1


def test_gvt_trains_connector_only_by_default_and_lora_adds_adapters():
    model = gvt_model()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    from lightning_tokens.modules import LoRASettings

    lora = gvt_model(lora=LoRASettings(r=2))
    names = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(n.startswith("connector.") for n in names)
    assert not any(n.startswith("vision_encoder.") for n in names)


def test_vision_encoder_stays_in_eval_mode():
    model = VisionLanguageLM(model="tiny-llama", tokenizer="char", model_config=TINY_LM, vision=VisionSettings(pretrained=False, image_size=64), resampler=TINY_RESAMPLER)
    model.configure_model()
    model.train()
    assert not model.vision_encoder.training  # MobileNetV2's batch norms keep their statistics
    assert model.connector.training


def test_generate_greedy_matches_a_manual_loop():
    model = gvt_model()
    batch = model.processor(images(1), QUESTIONS[:1])
    text = model.generate(batch, max_new_tokens=4)[0]
    embeds = model.input_embeddings(batch["prompt_input_ids"], batch["pixel_values"])
    tokens = []
    with torch.no_grad():
        for _ in range(4):
            hidden = model.causal_lm.get_decoder()(inputs_embeds=embeds).last_hidden_state[:, -1]
            token = model.causal_lm.get_output_embeddings()(hidden).argmax(-1)
            if int(token) == model.tokenizer.eos_token_id:
                break
            tokens.append(int(token))
            embeds = torch.cat([embeds, model.causal_lm.get_input_embeddings()(token)[:, None]], dim=1)
    assert text == model.tokenizer.decode(tokens, skip_special_tokens=True)


def test_bad_inputs_get_clear_errors():
    model = gvt_model()
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    no_placeholder = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == model.processor.placeholder_id, 5))
    with pytest.raises(ConfigError, match="no image placeholder"):
        model.hidden_states(no_placeholder)
    extra_image = dict(batch, pixel_values=torch.cat([batch["pixel_values"], batch["pixel_values"][:1]]))
    with pytest.raises(ConfigError, match="3 image\\(s\\) × 4 visual tokens"):
        model.hidden_states(extra_image)
    wrong_size = dict(batch, pixel_values=torch.zeros(2, 3, 48, 48))
    with pytest.raises(ConfigError, match="image_size"):
        model.hidden_states(wrong_size)
    with pytest.raises(ConfigError, match="no pixel_values"):
        model.hidden_states({k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(DataError, match="empty"):
        model.processor(images(1), ["q"], ["  "])
    with pytest.raises(DataError, match="one image per question"):
        model.processor(images(2), ["q"], ["a"])
    with pytest.raises(ConfigError, match="vision"):
        VisionLanguageLM(model="tiny-qwen2-vl", vision=TINY_VIT)


def test_fit_resumes_exactly_from_a_checkpoint(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tokens import VisualQADataModule

    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = VisionLanguageLM(model="tiny-llama", tokenizer="char", model_config=TINY_LM, vision=TINY_VIT,
                                 resampler=TINY_RESAMPLER, train_language_model=True)
        data = VisualQADataModule(tasks=["counting", "mci"], image_size=40, max_count=2, max_distractors=1,
                                  num_train=16, num_val=2, num_test=2, batch_size=4, seed=0)
        every_two = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, callbacks=[every_two])
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model

    straight = run()
    resumed = run(ckpt_path=str(tmp_path / "step=2.ckpt"))  # mid-epoch: the shuffled order resumes too
    trained = {k: v for k, v in straight.state_dict().items() if k.startswith(("connector.", "model."))}
    assert trained and all(torch.equal(resumed.state_dict()[k], v) for k, v in trained.items())


def test_an_exported_folder_restarts_with_its_trained_connector(tmp_path):
    torch.manual_seed(0)
    model = gvt_model(train_language_model=True)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(torch.randn_like(p))  # "trained": differs from any fresh initialisation
    model.save_pretrained(str(tmp_path))
    again = VisionLanguageLM(model=str(tmp_path), vision=TINY_VIT, resampler=TINY_RESAMPLER)
    again.configure_model()
    again.vision_encoder.load_state_dict(model.vision_encoder.state_dict())  # random-init tower in this test
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    assert again.tokenizer.convert_tokens_to_ids(IMAGE_START) == model.tokenizer.convert_tokens_to_ids(IMAGE_START)
    torch.testing.assert_close(again.hidden_states(batch), model.hidden_states(batch))
    wrong = VisionLanguageLM(model=str(tmp_path), vision=TINY_VIT, resampler=ResamplerSettings(num_latents=4, depth=2, heads=2, dim_head=16))
    with pytest.raises(ConfigError, match="another vision/resampler shape"):
        wrong.configure_model()


def test_references_score_with_their_own_connector(tmp_path):
    from lightning_tokens.core.reference import ReferenceSettings

    torch.manual_seed(0)
    exported = gvt_model(train_language_model=True)
    exported.save_pretrained(str(tmp_path))
    batch = exported.processor(images(), QUESTIONS, ANSWERS)
    for mode in ("model", "ema"):
        settings = ReferenceSettings(mode=mode, model=str(tmp_path) if mode == "model" else None)
        model = VisionLanguageLM(model=str(tmp_path), vision=TINY_VIT, resampler=TINY_RESAMPLER, train_language_model=True,
                                 reference=settings)
        model.configure_model()
        before = model.reference.stats(batch, model).nll
        policy_before = model.hidden_states(batch).detach()
        with torch.no_grad():
            for p in model.connector.parameters():
                p.add_(1.0)  # the policy's connector moves on; the reference's must not
        assert not torch.allclose(model.hidden_states(batch), policy_before)
        torch.testing.assert_close(model.reference.stats(batch, model).nll, before)
        if mode == "ema":
            assert any(name.startswith("connector.") for name in model.reference.average)


@pytest.mark.parametrize("name", list(HF_PRESETS))
def test_trained_hf_language_model_keeps_its_projector_trainable_and_tower_frozen(name):
    from lightning_tokens.modules.vision_language import _hf_vision_tower

    model = VisionLanguageLM(model=name, train_language_model=True)
    model.configure_model()
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert any(HF_PRESETS[name] in n for n in trainable)
    tower = {id(p) for n, p in _hf_vision_tower(model.model).named_parameters() if HF_PRESETS[name] not in f".{n}"}
    assert tower and not any(p.requires_grad for p in model.model.parameters() if id(p) in tower)
    assert any("language_model" in n or "text_model" in n for n in trainable)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava", "tiny-idefics3"])
def test_lora_on_hf_vlms_adapts_the_language_model_and_trains_the_projector(name):
    from lightning_tokens.modules.causal_lm import LoRASettings

    model = VisionLanguageLM(model=name, lora=LoRASettings(r=2))
    model.configure_model()
    trainable = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    lora_layers = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert all(("language_model" in n or "text_model" in n) for n in lora_layers), lora_layers
    projector = [n for n in trainable if "lora_" not in n]
    assert projector and all(any(p in n for p in ("merger", "multi_modal_projector", "connector")) for n in projector), projector


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava", "tiny-idefics3"])
def test_qlora_on_hf_vlms_quantizes_the_language_model_only(name, tmp_path):
    """4-bit loading (bitsandbytes' CPU kernels here; the GPU run is in benchmarks/gpu_check.sh): the language
    model's linear layers are 4-bit, the vision tower and the projector keep their dtype, and the adapters and
    the projector get gradients from the fused token loss."""
    import bitsandbytes as bnb

    from lightning_tokens.modules.causal_lm import LoRASettings

    base = VisionLanguageLM(model=name)
    base.configure_model()
    base.model.save_pretrained(tmp_path)
    base.processor.processor.save_pretrained(tmp_path)
    model = VisionLanguageLM(model=str(tmp_path), quantization="nf4", lora=LoRASettings(r=4))
    model.configure_model()
    quantized = [n for n, m in model.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = base.model.config.get_text_config().num_hidden_layers
    assert len(quantized) == 7 * layers and all(("language_model" in n or "text_model" in n) for n in quantized)
    batch = model.processor(images(), QUESTIONS, ANSWERS)
    loss = model._loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in n for n in grads)
    assert any(key in n for n in grads for key in ("merger", "multi_modal_projector", "connector"))
