"""GRPO against TRL's ``GRPOTrainer``: the same weights, the same rollout, the same loss and gradients.

Both sides load one tiny Llama saved with ``save_pretrained`` (with its tokenizer) in float64; the policy is
then perturbed, so that the reference (the saved weights) differs from it and the k3 KL is not zero. The
rollout (prompts of different lengths, completions cut by an eos or by the length limit) is built by hand and
fed to both: TRL's ``_compute_loss(model, inputs)`` is called directly on a constructed trainer, so no TRL
generation runs. The module is skipped where ``trl`` is not installed.

Layouts. TRL keeps prompts and completions apart: ``prompt_ids`` (B, P) left-padded, ``completion_ids`` (B, C)
right-padded, ``completion_mask`` (B, C) 1 up to and including the first eos; ``per_token_logps[:, j]`` is
``log π(completion_ids[:, j] | prompt, completion[:j])`` and so are ``old_per_token_logps`` and
``ref_per_token_logps``. Our rows (``rollout_rows``, what ``GRPO.rollout`` builds) are prompt + completion
from position 0, right-padded, with ``labels`` = the completion tokens at their own positions (not shifted,
-100 elsewhere): every statistic is (B, T) and indexed like ``labels``. Completion token j of row i sits at
the j-th labelled position of row i; ``_to_completions`` / ``_to_labels`` move tensors between the layouts.
TRL's left padding shifts the absolute positions of a short prompt; RoPE attention depends only on relative
positions, so the log-probabilities agree to rounding.

Aggregation. ``dapo`` (TRL's default) divides the token sum by ``num_items_in_batch`` (the kept tokens of the
generation batch) / processes × accumulation steps / steps per generation: with one process, one micro-batch
and ``steps_per_generation = 1`` that is the kept-token count, our ``token-mean``. ``grpo`` is the mean over all
B rows of each row's token mean (our ``aggregate(..., "grpo")``; ``"seq-mean-token-mean"`` gives the same
value here, since every row keeps a token). ``bnpo`` is the micro-batch token mean; ``dr_grpo`` divides by
B × ``max_completion_length``. TRL divides every mode but ``dapo`` by ``current_gradient_accumulation_steps``,
which its training loop sets (1 here). See ``TRL_LOSS_TYPES`` in ``lightning_tokens/rl/losses.py``.

Precision. Our fused log-probabilities run in float64 for float64 weights. TRL 1.16's fused LM head
(``trl.kernels.ChunkedLogProbFunction``) folds the logits in float32 and accumulates its backward in float32
whatever the model's dtype, so TRL's side is only float32-accurate there. The tolerances below (rtol=atol=1e-6)
hold with that; a float64 full-logits computation (``_float64_logps``) pins our log-probabilities at 1e-12.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from lightning_tokens import GRPO  # noqa: E402
from lightning_tokens.core.reference import ReferenceSettings  # noqa: E402
from lightning_tokens.modules.grpo import Rollout  # noqa: E402
from lightning_tokens.rl import aggregate, kl_penalty  # noqa: E402
from lightning_tokens.rl.rollout import rollout_rows  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
TEMPERATURE = 0.7
MAX_COMPLETION = 6
GENERATIONS = 3
PROMPTS = ["max(12, 7) = ", "max(3, 845) = "]  # different lengths: TRL left-pads the first
# hand-made completions, GENERATIONS per prompt: eos-terminated ones of several lengths (an eos alone
# included), and ones cut by the length limit (no eos, MAX_COMPLETION tokens)
COMPLETIONS = ["12<eos>", "7<eos>", "123456", "845<eos>", "<eos>", "84 5 8"]
TOL = {"rtol": 1e-6, "atol": 1e-6}
TRL_TO_OURS = {"dapo": "token-mean", "grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo"}


def reward_len(completions, **_):
    """A dummy reward function: GRPOTrainer needs one, the test never generates."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The reference: a tiny Llama with random weights and the char tokenizer, saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = GRPO(model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch")
    model.configure_model()
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def trainers(folder, tmp_path_factory):
    """TRL trainers by ``(loss_type, beta, use_bias_correction_kl)``, built on first use; each policy is the saved
    model + the same noise."""
    cache = {}
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    out = tmp_path_factory.mktemp("trl")

    def get(loss_type, beta, bias_correction=False):
        key = loss_type, beta, bias_correction
        if key not in cache:
            args = GRPOConfig(
                output_dir=str(out), use_cpu=True, bf16=False, fp16=False, report_to=[], loss_type=loss_type, beta=beta,
                use_bias_correction_kl=bias_correction, temperature=TEMPERATURE, num_generations=GENERATIONS,
                per_device_train_batch_size=len(COMPLETIONS), max_completion_length=MAX_COMPLETION,
                model_init_kwargs={"dtype": torch.float64}, gradient_checkpointing=False, disable_tqdm=True,
                save_strategy="no", logging_strategy="no",
            )
            trainer = GRPOTrainer(model=folder, reward_funcs=reward_len, args=args, train_dataset=dataset)
            assert trainer.model.dtype == torch.float64 and (beta == 0) == (trainer.ref_model is None)
            _perturb(trainer.model)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop: one micro-batch per step
            cache[key] = trainer
        return cache[key]

    return get


def _perturb(model):
    """The policy = the reference + fixed noise (the same on both sides: ours copies TRL's state dict)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ours(folder, trainer, beta):
    reference = ReferenceSettings(mode="model", model=folder) if beta else None
    model = GRPO(model=folder, tokenizer=folder, dtype="float64", loss_backend="torch", temperature=TEMPERATURE,
                 beta=beta, reference=reference, num_generations=GENERATIONS, max_completion_length=MAX_COMPLETION)
    model.configure_model()
    model.causal_lm.load_state_dict(trainer.model.state_dict())
    assert model.causal_lm.dtype == torch.float64
    return model


def _layouts(tokenizer):
    """The rollout in TRL's layout and in ours."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(GENERATIONS)]
    completions = []
    for text in COMPLETIONS:
        ids = tokenizer(text.replace("<eos>", ""), add_special_tokens=False)["input_ids"]
        completions.append(ids + [eos] if text.endswith("<eos>") else ids)
    assert all(len(c) == MAX_COMPLETION for c in completions if c[-1] != eos)
    b, p = len(prompts), max(map(len, prompts))
    prompt_ids = torch.full((b, p), pad)
    prompt_mask = torch.zeros((b, p), dtype=torch.long)
    completion_ids = torch.full((b, MAX_COMPLETION), pad)
    completion_mask = torch.zeros((b, MAX_COMPLETION), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids[i, p - len(prompt):], prompt_mask[i, p - len(prompt):] = torch.tensor(prompt), 1
        completion_ids[i, : len(completion)], completion_mask[i, : len(completion)] = torch.tensor(completion), 1
    trl = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
           "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum()}
    # ours, the way GRPO.rollout builds it from the sampled ids (the padding after an eos is dropped there)
    rows = rollout_rows(prompt_ids, prompt_mask, completion_ids, eos, pad)
    assert rows.completion_lengths.tolist() == completion_mask.sum(-1).tolist()
    return trl, rows


def _to_completions(x, labels, width):
    """(B, T) in our label layout → (B, width) in TRL's completion layout."""
    out = x.new_zeros((x.shape[0], width))
    for i in range(x.shape[0]):
        values = x[i][labels[i] != -100]
        out[i, : values.numel()] = values
    return out


def _to_labels(x, labels):
    """(B, C) in TRL's completion layout → (B, T) in our label layout (0 elsewhere)."""
    out = x.new_zeros(labels.shape)
    for i in range(labels.shape[0]):
        where = labels[i] != -100
        out[i, where] = x[i, : int(where.sum())]
    return out


def _float64_logps(causal_lm, batch):
    """float64 full logits / temperature, log-softmax, read at the labels: our log-probabilities, unfused."""
    with torch.no_grad():
        logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = F.log_softmax(logits / TEMPERATURE, -1).gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1))
    return F.pad(logp.squeeze(-1), (1, 0)) * (batch["labels"] != -100)


def _case(folder, trainer, beta, off_policy):
    """Our model and one rollout in both layouts, with advantages, (off-policy) old and (beta > 0) reference
    log-probabilities; checks on the way that both sides score the rollout alike."""
    ours = _ours(folder, trainer, beta)
    inputs, rows = _layouts(ours.tokenizer)
    labels = rows.labels
    batch = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "labels": labels}
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mask = inputs["completion_mask"].bool()

    # the log-probabilities of both sides, in TRL's layout (TRL's are float32-accurate, see the module docstring)
    with torch.no_grad():
        theirs_logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, MAX_COMPLETION)
        ours_logp = -ours._stats(batch, with_entropy=False).nll
    theirs_logp = theirs_logp.double()
    torch.testing.assert_close(ours_logp, _float64_logps(ours.causal_lm, batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_to_completions(ours_logp, labels, MAX_COMPLETION)[mask], theirs_logp[mask], **TOL)

    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(len(COMPLETIONS), generator=g, dtype=torch.float64)
    inputs["advantages"] = advantages
    old_logp = None
    if off_policy:  # the sampling policy's log-probabilities differ from the current ones: the clip acts
        old = (theirs_logp + 0.3 * torch.randn(theirs_logp.shape, generator=g, dtype=torch.float64)) * mask
        inputs["old_per_token_logps"] = old
        old_logp = _to_labels(old, labels)
    if beta:  # as TRL's _generate_and_score_completions does it: its reference model, before the update
        with torch.no_grad():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, input_ids, attention_mask, MAX_COMPLETION)
            ours_ref = ours._reference_logp(dict(batch))
        torch.testing.assert_close(_to_completions(ours_ref, labels, MAX_COMPLETION)[mask], ref[mask].double(), **TOL)
        assert (ref - theirs_logp)[mask].abs().min() > 1e-4  # the reference differs from the policy at every token
        inputs["ref_per_token_logps"] = ref
    rollout = Rollout(batch=batch, advantages=advantages, rewards=advantages, per_function={}, completions=COMPLETIONS,
                      prompts=[p for p in PROMPTS for _ in range(GENERATIONS)], completion_lengths=rows.completion_lengths,
                      truncated=rows.truncated, old_logp=old_logp)
    return ours, inputs, rollout


def _trl_loss(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach().double()


def _reduce(ours, per_token, keep, loss_type):
    """Our scalar loss for TRL's ``loss_type``: GRPO._reduce's token mean on one process and one micro-batch for
    ``dapo``, else ``aggregate`` with TRL's own formula."""
    mode = TRL_TO_OURS[loss_type]
    if mode == "token-mean":
        return per_token.sum() / keep.sum()
    return aggregate(per_token, keep, mode, max_len=ours.max_completion_length)


def _assert_same_gradients(ours, trainer):
    theirs = dict(trainer.model.named_parameters())
    names = [name for name, _ in ours.causal_lm.named_parameters()]
    assert names == list(theirs)
    for name, p in ours.causal_lm.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "clipped"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradients_equal_trl(folder, trainers, loss_type, beta, off_policy):
    """TRL with ``use_bias_correction_kl=False``: its per-token loss is the clipped surrogate + β·k3, ours too."""
    trainer = trainers(loss_type, beta)
    ours, inputs, rollout = _case(folder, trainer, beta, off_policy)
    theirs = _trl_loss(trainer, inputs)

    per_token, keep, logs = ours.objective(rollout)
    assert keep.equal(rollout.batch["labels"] != -100)
    loss = _reduce(ours, per_token, keep, loss_type)
    loss.backward()

    torch.testing.assert_close(loss, theirs, **TOL)
    _assert_same_gradients(ours, trainer)
    clip_fraction = float(logs["train/clip_fraction"])
    assert (0 < clip_fraction < 1) if off_policy else clip_fraction == 0
    if beta:
        ref, mask = inputs["ref_per_token_logps"].double(), inputs["completion_mask"].bool()
        logp = _to_completions(-ours._stats(rollout.batch, with_entropy=False).nll.detach(), rollout.batch["labels"], MAX_COMPLETION)
        k3 = (torch.exp(ref - logp) - (ref - logp) - 1)[mask].mean()
        torch.testing.assert_close(logs["train/kl"], k3, **TOL)


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "clipped"])
def test_trl_default_kl_is_weighted_by_the_ratio(folder, trainers, off_policy):
    """TRL 1.16's default ``use_bias_correction_kl=True`` multiplies the k3 term by the policy ratio
    ``r = π/π_old`` (DeepSeek-V3.2's unbiased KL gradient); ours adds plain k3, as verl does. On-policy the values
    agree (``r = 1``) but the gradients do not (``∇(k3·r) = ∇k3 + k3·∇log π``). TRL's default is exactly ours
    + β·agg(k3·(r − 1)), which this test checks, with our own log-probabilities."""
    beta = 0.04
    trainer = trainers("dapo", beta, bias_correction=True)
    ours, inputs, rollout = _case(folder, trainer, beta, off_policy)
    theirs = _trl_loss(trainer, inputs)

    per_token, keep, _ = ours.objective(rollout)
    plain = _reduce(ours, per_token, keep, "dapo")
    plain.backward(retain_graph=True)
    plain_grads = {name: p.grad.clone() for name, p in ours.causal_lm.named_parameters()}
    logp = -ours._stats(rollout.batch, with_entropy=False).nll
    ref_logp = ours._reference_logp(dict(rollout.batch))
    old = logp.detach() if rollout.old_logp is None else rollout.old_logp
    extra = beta * kl_penalty(logp, ref_logp, "low_var_kl") * (torch.exp(logp - old) - 1)
    correction = _reduce(ours, torch.where(keep, extra, torch.zeros_like(extra)), keep, "dapo")
    correction.backward()

    torch.testing.assert_close(plain + correction, theirs, **TOL)
    _assert_same_gradients(ours, trainer)
    if not off_policy:  # same value, different gradient
        torch.testing.assert_close(plain, theirs, **TOL)
        differs = [not torch.allclose(plain_grads[name], p.grad, rtol=1e-4, atol=1e-6)
                   for name, p in ours.causal_lm.named_parameters()]
        assert any(differs)
