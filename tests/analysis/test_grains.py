"""GrAInS: integrated gradients (captum's rules, completeness), contrastive attributions against a float64
loop, selection and ablation, directions against sklearn's PCA, the spec's renormalisation values, the
hook, saving and loading, the ``steer`` subcommand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.analysis.steering import (
    GrainsSettings,
    SteeringExample,
    SteeringVectors,
    ablate,
    add_steering_hook,
    build_steering_vectors,
    contrastive_token_attributions,
    decoder_layers,
    example_diffs,
    integrated_gradients,
    last_token_hidden_states,
    module_forward,
    preference_margins,
    quadrature,
    steer_hidden,
    steering,
    steering_direction,
    target_log_prob,
    top_token_indices,
)
from lightning_tokens.analysis.steering.command import read_pairs
from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.modules import TokenLM

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    module = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    module.configure_model()
    module.eval()
    return module


# ---- integrated gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_ig_of_a_linear_function_is_x_times_w_and_complete(method):
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    ig = integrated_gradients(lambda z: z @ w, x, steps=20, method=method)
    torch.testing.assert_close(ig, torch.tensor([[0.5, -2.0, 6.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert ig.sum().item() == pytest.approx(4.5, abs=1e-12)  # f(x) - f(0)


def test_riemann_trapezoid_keeps_captums_weights_summing_to_one_minus_one_over_n():
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    ig = integrated_gradients(lambda z: z @ w, x, steps=20, method="riemann_trapezoid")
    assert ig.sum().item() == pytest.approx(4.5 * (1 - 1 / 20), abs=1e-12)


def test_quadrature_matches_captums_formulas():
    nodes, weights = quadrature(2)
    torch.testing.assert_close(nodes, torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    x, w = np.polynomial.legendre.leggauss(20)
    nodes, weights = quadrature(20)
    np.testing.assert_allclose(nodes.numpy(), 0.5 * (1 + x))
    np.testing.assert_allclose(weights.numpy(), 0.5 * w)
    np.testing.assert_allclose(quadrature(4, "riemann_left")[0].numpy(), np.linspace(0, 0.75, 4))
    np.testing.assert_allclose(quadrature(4, "riemann_middle")[0].numpy(), np.linspace(0.125, 0.875, 4))
    np.testing.assert_allclose(quadrature(4, "riemann_right")[0].numpy(), np.linspace(0.25, 1, 4))
    np.testing.assert_allclose(quadrature(4, "riemann_trapezoid")[1].numpy(), [0.125, 0.25, 0.25, 0.125])
    with pytest.raises(ConfigError, match="method must be one of"):
        quadrature(20, "simpson")


def test_ig_is_complete_on_a_polynomial_with_a_baseline_and_chunks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, dtype=torch.float64, generator=g)
    x, base = torch.randn(2, 5, dtype=torch.float64, generator=g), torch.randn(2, 5, dtype=torch.float64, generator=g)
    f = lambda z: (z @ a) ** 3 + (z**2).sum(-1)  # noqa: E731  degree 3: Gauss-Legendre with 20 nodes is exact
    ig = integrated_gradients(f, x, base, steps=20)
    torch.testing.assert_close(ig.sum(-1), f(x) - f(base), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(integrated_gradients(f, x, base, steps=20, batch_size=3), ig, rtol=1e-12, atol=1e-12)
    # per coordinate, exactly the integral of the gradient along the path (closed form for the square term)
    ig_sq = integrated_gradients(lambda z: (z**2).sum(-1), x, base, steps=20)
    torch.testing.assert_close(ig_sq, (x - base) * (x + base), rtol=1e-12, atol=1e-12)


# ---- contrastive attributions on a model ---------------------------------------------------------------
def _example(tok):
    return SteeringExample.from_text(tok, "2+3", "5", "6")


def test_target_log_prob_last_and_the_references_repeat(tiny):
    forward_fn, embed, lm = module_forward(tiny)
    ids = _example(tiny.tokenizer).pos_ids
    logits = lm(input_ids=ids).logits[0]
    with torch.no_grad():
        last = target_log_prob(forward_fn, embed(ids), ids, target="last")
        repeat = target_log_prob(forward_fn, embed(ids), ids, target="repeat")
    assert last.item() == pytest.approx(F.log_softmax(logits[-2], -1)[ids[0, -1]].item(), abs=1e-5)
    assert repeat.item() == pytest.approx(F.log_softmax(logits[-1], -1)[ids[0, -1]].item(), abs=1e-5)


@pytest.mark.parametrize("target", ["last", "repeat"])
def test_contrastive_ig_equals_a_float64_loop_over_captums_nodes(tiny, target):
    lm = tiny.causal_lm
    lm64 = type(lm)(lm.config).double().eval()
    lm64.load_state_dict(lm.state_dict())
    ex = _example(tiny.tokenizer)
    embed = lm64.get_input_embeddings()
    pos_e, neg_e = embed(ex.pos_ids).detach(), embed(ex.neg_ids).detach()
    at = -2 if target == "last" else -1

    def logp(e, ids):
        return F.log_softmax(lm64(inputs_embeds=e).logits[:, at], -1)[:, ids[0, -1]]

    nodes, weights = quadrature(3)
    grads_pos, grads_neg = torch.zeros_like(pos_e), torch.zeros_like(neg_e)
    for a, w in zip(nodes.tolist(), weights.tolist()):  # naive: one interpolation point at a time
        p, n = (a * pos_e).requires_grad_(), (a * neg_e).requires_grad_()
        (logp(p, ex.pos_ids) - logp(n, ex.neg_ids)).sum().backward()
        grads_pos += w * p.grad
        grads_neg += w * n.grad
    ref_pos, ref_neg = (pos_e * grads_pos)[0].sum(-1), (neg_e * grads_neg)[0].sum(-1)

    forward_fn = module_forward(lm64)[0]
    s_pos, s_neg = contrastive_token_attributions(forward_fn, pos_e, neg_e, ex.pos_ids, ex.neg_ids, target=target, steps=3)
    torch.testing.assert_close(s_pos.double(), ref_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_neg.double(), ref_neg, rtol=1e-5, atol=1e-6)
    # (no completeness check here: RMSNorm of α·x is a step near α = 0, which 20 nodes do not resolve)
    if target == "last":  # the answer's last token cannot move the logits that predict it
        assert s_pos[-1].item() == 0.0 and s_neg[-1].item() == 0.0


def test_gradient_x_input_is_the_gradient_at_the_input_times_the_input(tiny):
    forward_fn, embed, _ = module_forward(tiny)
    ex = _example(tiny.tokenizer)
    pos_e, neg_e = embed(ex.pos_ids).detach(), embed(ex.neg_ids).detach()
    s_pos, s_neg = contrastive_token_attributions(forward_fn, pos_e, neg_e, ex.pos_ids, ex.neg_ids, attribution="gradient_x_input")
    p, n = pos_e.clone().requires_grad_(), neg_e.clone().requires_grad_()
    (target_log_prob(forward_fn, p, ex.pos_ids) - target_log_prob(forward_fn, n, ex.neg_ids)).sum().backward()
    torch.testing.assert_close(s_pos, (p.grad * pos_e)[0].sum(-1))
    torch.testing.assert_close(s_neg, (n.grad * neg_e)[0].sum(-1))


def test_extra_inputs_pass_through_and_fixed_positions_stay_put(tiny):
    """A stand-in vision-language forward: ``pixel_values`` shift the embeddings at placeholder positions
    (which must reach it unscaled) and every row of the IG batch gets them."""
    _, embed, lm = module_forward(tiny)
    ex = _example(tiny.tokenizer)
    placeholder = torch.zeros(ex.pos_ids.shape[1], dtype=torch.bool)
    placeholder[:2] = True
    seen = []

    def vlm_forward(inputs_embeds, input_ids=None, pixel_values=None, output_hidden_states=False, logits_to_keep=0):
        assert pixel_values is not None and pixel_values.shape[0] == inputs_embeds.shape[0]
        mask = placeholder[: inputs_embeds.shape[1]].view(1, -1, 1)
        seen.append(inputs_embeds[:, :2].detach().clone())
        image = pixel_values.mean(dim=(1, 2, 3)).view(-1, 1, 1) * torch.ones_like(inputs_embeds)
        return lm(inputs_embeds=torch.where(mask, image, inputs_embeds), output_hidden_states=output_hidden_states,
                  logits_to_keep=logits_to_keep, use_cache=False)

    pos_e, neg_e = embed(ex.pos_ids).detach(), embed(ex.neg_ids).detach()
    scores = {}
    for value in (0.5, 2.0):
        extra = {"pixel_values": torch.full((1, 3, 4, 4), value)}
        scores[value] = contrastive_token_attributions(
            vlm_forward, pos_e, neg_e, ex.pos_ids, ex.neg_ids, extra, extra, placeholder, placeholder, steps=2)
    assert all(torch.equal(s, pos_e[:, :2].expand_as(s)) or torch.equal(s, neg_e[:, :2].expand_as(s)) for s in seen)
    assert torch.all(scores[0.5][0][:2] == 0) and torch.all(scores[0.5][1][:2] == 0)
    assert not torch.allclose(scores[0.5][0], scores[2.0][0])  # the image changes the attributions
    hidden = last_token_hidden_states(vlm_forward, embed, ex.pos_ids, {"pixel_values": torch.ones(1, 3, 4, 4)})
    assert hidden.shape == (TINY["num_hidden_layers"], TINY["hidden_size"])
    eligible_positions = example_diffs(vlm_forward, embed, SteeringExample(ex.pos_ids, ex.neg_ids, None, {"pixel_values": torch.ones(1, 3, 4, 4)},
                                                                           {"pixel_values": torch.ones(1, 3, 4, 4)}, placeholder, placeholder),
                                       0, GrainsSettings(steps=2, top_k=3))
    for key in ("positions_pos_pos", "positions_pos_neg", "positions_neg_pos", "positions_neg_neg"):
        assert eligible_positions[key].min() >= 2  # placeholders are never ablated


# ---- selection, ablation ---------------------------------------------------------------------------
def test_top_k_by_sign_and_ablation_by_the_pad_token():
    scores = torch.tensor([0.1, -2.0, 3.0, 0.5, -0.3])
    assert top_token_indices(scores, 2, "pos").tolist() == [2, 3]
    assert top_token_indices(scores, 2, "neg").tolist() == [1, 4]
    assert top_token_indices(scores, 2, "abs").tolist() == [2, 1]
    assert top_token_indices(scores, 10, "pos").tolist() == [2, 3, 0, 4, 1]  # k > T: every token, as the reference
    assert top_token_indices(scores, 2, "pos", eligible=torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)).tolist() == [3, 0]
    assert ablate(torch.tensor([[7, 8, 9, 10]]), torch.tensor([3, 1]), 0).tolist() == [[7, 0, 9, 0]]
    with pytest.raises(ConfigError, match="top_k=0"):
        top_token_indices(scores, 0)


def test_prompt_length_counts_the_prompt_tokens(tiny):
    ex = SteeringExample.from_text(tiny.tokenizer, "abc", "de", "f", template="Q: {prompt}\nA:")
    assert ex.prompt_length == len("Q: abc\nA:")  # the char tokenizer: one token per character
    assert ex.pos_ids.shape[1] == len("Q: abc\nA: de")


# ---- directions ------------------------------------------------------------------------------------
def test_directions_against_sklearn_pca_and_the_mean():
    decomposition = pytest.importorskip("sklearn.decomposition")
    g = torch.Generator().manual_seed(3)
    diffs = torch.randn(3, 12, 6, dtype=torch.float64, generator=g) + torch.tensor([0.5, -2.0, 0.0, 1.0, 0.0, 0.3], dtype=torch.float64)
    ours = steering_direction(diffs, "pca")
    flip = steering_direction(diffs, "pca", orientation="svd_flip")
    for layer in range(3):
        ref = torch.from_numpy(decomposition.PCA(n_components=1).fit(diffs[layer].numpy()).components_[0])
        assert abs(torch.dot(ours[layer], ref).item()) == pytest.approx(1.0, abs=1e-10)
        assert torch.dot(diffs[layer].mean(0), ours[layer]).item() > 0  # oriented to the mean difference
        torch.testing.assert_close(flip[layer], ref, rtol=1e-8, atol=1e-10)  # sklearn's own sign rule
    torch.testing.assert_close(steering_direction(diffs, "mean"), diffs.mean(1))


def test_build_steering_vectors_equals_a_hand_computed_reference(tiny):
    forward_fn, embed, lm = module_forward(tiny)
    tok = tiny.tokenizer
    pairs = [("2+3", "5", "6"), ("1+1", "2", "3")]
    examples = [SteeringExample.from_text(tok, *p) for p in pairs]
    settings = GrainsSettings(steps=2, top_k=3)
    built = build_steering_vectors(forward_fn, embed, examples, tok.pad_token_id, settings, keep_diffs=True)
    assert built.layers == [0, 1] and set(built.directions) == {"pos/pca", "pos/mean", "neg/pca", "neg/mean"}
    for selection in ("pos", "neg"):
        rows = []
        for ex in examples:  # by hand: attributions, top-3 of each sequence, pad, hidden_states[layer + 1][0, -1]
            s_pos, s_neg = contrastive_token_attributions(forward_fn, embed(ex.pos_ids).detach(), embed(ex.neg_ids).detach(),
                                                          ex.pos_ids, ex.neg_ids, steps=2)
            for ids, s in ((ex.pos_ids, s_pos), (ex.neg_ids, s_neg)):
                order = torch.argsort(s if selection == "neg" else -s)[:3]
                cut = ids.clone()
                cut[0, order] = tok.pad_token_id
                with torch.no_grad():
                    h = torch.stack(lm(input_ids=ids, output_hidden_states=True).hidden_states[1:])[:, 0, -1]
                    h_cut = torch.stack(lm(input_ids=cut, output_hidden_states=True).hidden_states[1:])[:, 0, -1]
                rows.append(h - h_cut)
        diffs = torch.stack(rows, 1)  # (L, 2N, D), ordered [pos_1, neg_1, pos_2, ...]
        torch.testing.assert_close(built.info["diffs"][selection].float(), diffs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(built.directions[f"{selection}/mean"], diffs.double().mean(1).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(built.vector(layer=-1, mode="both", method="pca"), built.directions["pos/pca"][1] - built.directions["neg/pca"][1])


def test_block_output_differs_from_output_hidden_states_only_at_the_last_layer(tiny):
    forward_fn, embed, lm = module_forward(tiny)
    ids = _example(tiny.tokenizer).pos_ids
    ref = last_token_hidden_states(forward_fn, embed, ids)
    block = last_token_hidden_states(forward_fn, embed, ids, hidden_source="block_output", layers=decoder_layers(lm))
    torch.testing.assert_close(block[:-1], ref[:-1])
    assert not torch.allclose(block[-1], ref[-1])  # hidden_states[-1] is after the final norm
    torch.testing.assert_close(lm.get_decoder().norm(block[-1]), ref[-1], rtol=1e-5, atol=1e-5)


# ---- the hook ------------------------------------------------------------------------------------
def test_renormalisation_reproduces_the_spec_values():
    h = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]], dtype=torch.float64)  # one sequence (B=1) of two tokens, D=2
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per_token = steer_hidden(h, v, alpha=4.0)
    reference = steer_hidden(h, v, alpha=4.0, norm_dim=1)  # the reference's norm(dim=1): the sequence axis
    torch.testing.assert_close(per_token[0], torch.tensor([[4.9785, 0.4631], [0.9997, 0.0250]], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(reference[0], torch.tensor([[2.1966, 4.0], [2.0433, 1.0]], dtype=torch.float64), atol=1e-4, rtol=0)
    # exact: steered = h + 40 v, rescaled to the original norm
    steered = torch.tensor([[43.0, 4.0], [40.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(per_token[0], steered * torch.tensor([[5 / math.hypot(43, 4)], [1 / math.hypot(40, 1)]], dtype=torch.float64))
    torch.testing.assert_close(per_token.norm(dim=-1), h.norm(dim=-1))
    torch.testing.assert_close(steer_hidden(h, v, 4.0, norm_dim=None), h + 40 * v)
    with pytest.raises(ConfigError, match="norm_dim=0"):
        steer_hidden(h, v, 4.0, norm_dim=0)


def test_hook_steers_one_block_and_is_removed(tiny):
    lm = tiny.causal_lm
    blocks = decoder_layers(lm)
    ids = _example(tiny.tokenizer).pos_ids
    v = torch.randn(TINY["hidden_size"])
    ours = lambda block: sum("add_steering_hook" in h.__qualname__ for h in block._forward_hooks.values())  # noqa: E731
    with torch.no_grad():
        plain = lm(input_ids=ids, output_hidden_states=True)
        with steering(lm, layer=0, vector=v, alpha=2.0):
            assert ours(blocks[0]) == 1 and ours(blocks[1]) == 0
            seen = []  # a hook registered after ours sees what block 1 receives
            probe = blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
            lm(input_ids=ids)
            probe.remove()
        torch.testing.assert_close(seen[0], steer_hidden(plain.hidden_states[1], v, 2.0))
        assert ours(blocks[0]) == 0
        torch.testing.assert_close(lm(input_ids=ids).logits, plain.logits)
        handle = add_steering_hook(blocks[1], v, 0.0)  # alpha 0: the block's output is unchanged (up to eps)
        torch.testing.assert_close(lm(input_ids=ids).logits, plain.logits, rtol=1e-5, atol=1e-5)
        handle.remove()


# ---- files ---------------------------------------------------------------------------------------
def test_save_load_round_trip_and_errors(tmp_path):
    directions = {k: torch.randn(3, 4) for k in ("pos/pca", "pos/mean", "neg/pca", "neg/mean")}
    vectors = SteeringVectors(directions, [1, 2, 3], GrainsSettings(layer=2, alpha=1.5), {"num_layers": 4})
    paths = vectors.save(str(tmp_path / "v"))
    meta = json.loads(open(paths["metadata"]).read())
    assert meta["layers"] == [1, 2, 3] and meta["settings"]["alpha"] == 1.5 and meta["method"] == "GrAInS"
    loaded = SteeringVectors.load(str(tmp_path / "v"))
    torch.testing.assert_close(loaded.vector(), directions["pos/pca"][1] - directions["neg/pca"][1])
    torch.testing.assert_close(loaded.vector(layer=-1, mode="neg", method="mean"), directions["neg/mean"][2])
    with pytest.raises(ConfigError, match=r"built for layers \[1, 2, 3\]"):
        loaded.vector(layer=0)
    with pytest.raises(MissingFileError, match="lightning-tokens steer"):
        SteeringVectors.load(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"mode=.both.\) needs selections"):
        GrainsSettings(selections=["pos"]).validate()


def test_read_pairs_names_the_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "preferred": "b", "dispreferred": "c"}\n\n{"prompt": "a", "preferred": ""}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:3: field 'preferred'"):
        read_pairs(str(path))
    assert read_pairs(str(path), limit=1) == [{"prompt": "a", "preferred": "b", "dispreferred": "c"}]


def test_preference_margins_are_last_token_log_prob_differences(tiny):
    forward_fn, embed, lm = module_forward(tiny)
    ex = _example(tiny.tokenizer)
    with torch.no_grad():
        lp = lambda ids: F.log_softmax(lm(input_ids=ids).logits[0, -2], -1)[ids[0, -1]]  # noqa: E731
        expected = (lp(ex.pos_ids) - lp(ex.neg_ids)).item()
    assert preference_margins(forward_fn, embed, [ex]).item() == pytest.approx(expected, abs=1e-5)


# ---- the CLI -------------------------------------------------------------------------------------
def test_steer_subcommand_writes_vectors_metadata_and_report(tmp_path):
    from lightning_tokens.cli import cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "preferred": a, "dispreferred": b}) + "\n"
                             for p, a, b in [("2+3", "5", "6"), ("1+1", "2", "3"), ("4+4", "8", "9")]))
    out = tmp_path / "vectors"
    cli(["steer", "--model=lightning_tokens.TokenLM", "--model.init_args.model=tiny-llama", "--model.init_args.tokenizer=char",
         f"--model.init_args.model_config={json.dumps(TINY)}", "--trainer.logger=false", "--trainer.accelerator=cpu",
         "--data=lightning_tokens.NUPADataModule", "--data.init_args.tokenizer=char",  # the CLI requires a data section; steer ignores it
         f"--pairs_file={pairs}", f"--eval_file={pairs}", f"--output={out}", "--grains.steps=4", "--grains.top_k=3",
         "--grains.alpha=2.0", "--grains.layer=0"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["layers"] == [0, 1] and meta["num_examples"] == 3 and meta["settings"]["alpha"] == 2.0 and meta["settings"]["top_k"] == 3
    report = json.loads((out / "report.json").read_text())
    assert report["num_eval_pairs"] == 3 and len(report["margins_steered"]) == 3
    assert report["margins_base"] != report["margins_steered"]
    loaded = SteeringVectors.load(str(out))
    assert loaded.vector().shape == (TINY["hidden_size"],) and loaded.settings.layer == 0


@pytest.mark.slow
def test_grains_config_on_the_packaged_smollm2(tmp_path):
    """configs/grains_smollm2.yaml end to end on the real model: steer (2 pairs), then validate with and
    without the Steering callback."""
    from pathlib import Path

    from lightning_tokens.cli import cli

    root = Path(__file__).parents[2]
    config = str(root / "configs" / "grains_smollm2.yaml")
    out, held_out = tmp_path / "vectors", tmp_path / "held_out.jsonl"
    held_out.write_text("".join((root / "data/grains/heldout.jsonl").read_text().splitlines(keepends=True)[:2]))
    cli(["steer", "--config", config, f"--pairs_file={root / 'data/grains/steer.jsonl'}", "--num_pairs=2",
         f"--eval_file={held_out}", f"--output={out}", "--grains.layer=18"])
    report = json.loads((out / "report.json").read_text())
    assert report["num_pairs"] == 2 and all(math.isfinite(x) for x in report["margins_steered"])
    data = [f"--data.init_args.{k}={root / 'data/grains/heldout_sft.jsonl'}" for k in ("train_file", "val_file")]
    data.append(f"--trainer.default_root_dir={tmp_path / 'run'}")
    base = cli(["validate", "--config", config, *data, "--trainer.limit_val_batches=1"])
    steered = cli(["validate", "--config", config, *data, "--trainer.limit_val_batches=1",
                   "--trainer.callbacks+=lightning_tokens.callbacks.steering.Steering", f"--trainer.callbacks.path={out}"])
    assert steered.trainer.callback_metrics["val/loss"].item() != pytest.approx(base.trainer.callback_metrics["val/loss"].item(), abs=1e-4)


# ---- a vision-language module (GVT composition): the image takes part ----------------------------------
def test_vision_language_module_attributions_see_the_image_and_steering_hooks_its_lm():
    from PIL import Image

    from lightning_tokens.analysis.steering import vision_example
    from lightning_tokens.modules.vision_language import ResamplerSettings, VisionLanguageLM, VisionSettings

    torch.manual_seed(0)
    vlm = VisionLanguageLM(model="tiny-llama", tokenizer="char", model_config=TINY,
                           vision=VisionSettings(name="vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 8, "depth": 1}),
                           resampler=ResamplerSettings(num_latents=4, depth=1, heads=2, dim_head=16))
    vlm.configure_model()
    vlm.eval()
    forward_fn, embed, lm = module_forward(vlm)
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    ex_red, ex_blue = (vision_example(vlm, im, "Colour?", "red", "blue") for im in (red, blue))
    placeholder = vlm.processor.placeholder_id
    assert int(ex_red.pos_fixed.sum()) == 4 and torch.equal(ex_red.pos_fixed, ex_red.pos_ids[0] == placeholder)
    assert vlm.tokenizer.decode(ex_red.pos_ids[0, ex_red.prompt_length:]) == "red"  # the answer, without the eos
    # the module's own hidden states (its forward splices the image) equal ours through forward_fn
    with torch.no_grad():
        hidden = vlm(ex_red.pos_ids, pixel_values=ex_red.pos_extra["pixel_values"])
    ours = last_token_hidden_states(forward_fn, embed, ex_red.pos_ids, ex_red.pos_extra, "block_output", decoder_layers(lm))
    torch.testing.assert_close(lm.get_decoder().norm(ours[-1]), hidden[0, -1], rtol=1e-5, atol=1e-5)
    settings = GrainsSettings(steps=2, top_k=3)
    d_red = example_diffs(forward_fn, embed, ex_red, vlm.tokenizer.pad_token_id, settings)
    d_blue = example_diffs(forward_fn, embed, ex_blue, vlm.tokenizer.pad_token_id, settings)
    assert torch.all(d_red["scores_pos"][ex_red.pos_fixed] == 0)
    assert not torch.allclose(d_red["scores_pos"], d_blue["scores_pos"])  # same text, another image
    for key in ("positions_pos_pos", "positions_neg_neg"):
        assert not ex_red.pos_fixed[d_red[key]].any()  # placeholders are never ablated
    vectors = build_steering_vectors(forward_fn, embed, [ex_blue], vlm.tokenizer.pad_token_id, settings)
    base = preference_margins(forward_fn, embed, [ex_red])
    with steering(lm, -1, vectors.vector(), 4.0):
        steered = preference_margins(forward_fn, embed, [ex_red])
    assert steered.item() != pytest.approx(base.item(), abs=1e-6)


def test_hugging_face_vision_language_model_with_packed_patches_and_mrope():
    """tiny Qwen2-VL: the image patches are packed (no batch axis) and M-RoPE positions come from the ids,
    so rows run one forward each and the positions ride along; the forward on embeddings equals the model's."""
    from PIL import Image

    from lightning_tokens.analysis.steering import vision_example
    from lightning_tokens.modules.vision_language import VisionLanguageLM

    torch.manual_seed(0)
    vlm = VisionLanguageLM(model="tiny-qwen2-vl")
    vlm.configure_model()
    vlm.eval()
    forward_fn, embed, lm = module_forward(vlm)
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    ex_red, ex_blue = (vision_example(vlm, im, "Colour?", "red", "blue") for im in (red, blue))
    assert "position_ids" in ex_red.pos_extra and int(ex_red.pos_fixed.sum()) > 0
    with torch.no_grad():
        hidden = vlm(ex_red.pos_ids, **ex_red.pos_extra)
    ours = last_token_hidden_states(forward_fn, embed, ex_red.pos_ids, ex_red.pos_extra, "block_output", decoder_layers(lm))
    torch.testing.assert_close(lm.get_decoder().norm(ours[-1]), hidden[0, -1], rtol=1e-5, atol=1e-5)
    settings = GrainsSettings(steps=2, top_k=3)
    d_red = example_diffs(forward_fn, embed, ex_red, vlm.tokenizer.pad_token_id, settings)
    d_blue = example_diffs(forward_fn, embed, ex_blue, vlm.tokenizer.pad_token_id, settings)
    assert torch.all(d_red["scores_pos"][ex_red.pos_fixed] == 0) and not ex_red.pos_fixed[d_red["positions_pos_pos"]].any()
    assert not torch.allclose(d_red["scores_pos"], d_blue["scores_pos"])
