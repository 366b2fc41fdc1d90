"""The `lightning-tokens` CLI: every shipped config parses; fit/validate/test/predict from a checkpoint;
--print_config prints a config that runs as is."""

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_tokens.cli import cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
QUICKSTART = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")


def _quickstart_in(tmp_path):
    """The quickstart config writing under tmp_path instead of runs/quickstart."""
    config = tmp_path / "quickstart.yaml"
    config.write_text(Path(QUICKSTART).read_text().replace("runs/quickstart", str(tmp_path)))
    return str(config)


def _fast(tmp_path):
    """Overrides that shrink the quickstart to seconds (same classes, same code paths)."""
    return [
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.model_config={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_instantiates(config, tmp_path):
    text = config.read_text()
    if "model: runs/quickstart/export" in text:  # made by an earlier run (test_grpo_config_runs_...): a preset
        config = tmp_path / config.name
        config.write_text(text.replace("model: runs/quickstart/export", "model: tiny-llama\n    tokenizer: char"))
    if "runs/timemaster_sft/export" in text:  # made by configs/timemaster_sft.yaml (test_timemaster_recipe): a preset
        config = tmp_path / config.name
        text = text.replace("    model: runs/timemaster_sft/export", "    model: tiny-llama\n    tokenizer: smollm2-135m-instruct", 1)
        config.write_text(text.replace("model: runs/timemaster_sft/export", "model: tiny-llama"))
    if "runs/retok_codes" in text:  # made by `lightning-tokens extract_codes` (tests/modules/test_image_generation.py)
        from lightning_tokens.datamodules.image_codes import save_codes, write_code_tokenizer

        codes = tmp_path / "codes.safetensors"
        save_codes(codes, {"codes": torch.randint(0, 16, (200, 8)), "labels": torch.randint(-1, 10, (200,))}, 16, 10, 32, None)
        write_code_tokenizer(codes, 10, 16)
        config = tmp_path / config.name
        config.write_text(text.replace("runs/retok_codes", str(tmp_path / "codes")))
    if "QLoRAPrecision" in config.read_text() and not torch.cuda.is_available():
        # Lightning's bitsandbytes plugin needs CUDA: the config stops at once, saying what to use instead
        with pytest.raises(ValueError, match=r"needs a CUDA GPU.*set model\.quantization: nf4"):
            cli(["--config", str(config)], run=False)
        return
    built = cli(["--config", str(config)], run=False)
    assert built.model is not None and built.datamodule is not None


def test_fit_then_validate_test_predict_from_the_checkpoint(tmp_path):
    config = _quickstart_in(tmp_path)
    cli(["fit", "--config", config, *_fast(tmp_path)])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and (tmp_path / "checkpoints" / "tokenizer" / "tokenizer.json").exists()
    for subcommand in ("validate", "test"):
        run = cli([subcommand, "--config", config, *_fast(tmp_path), f"--ckpt_path={ckpt}"])
        assert f"{'val' if subcommand == 'validate' else 'test'}/exact_match" in run.trainer.callback_metrics

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Get the maximal number: 12 and 7 = "}\n{"prompt": "Get the maximal number: 3 and 95 = "}\n')
    answers = tmp_path / "answers.jsonl"
    cli(["predict", "--config", config, *_fast(tmp_path), f"--ckpt_path={ckpt}",
         f"--data.init_args.predict_file={prompts}", f"--predictions.output={answers}"])
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Get the maximal number: 12 and 7 = ", "Get the maximal number: 3 and 95 = "]
    assert all(isinstance(r["output"], str) and "answer" in r for r in records)


def test_print_config_prints_a_config_that_runs_as_is(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", _quickstart_in(tmp_path), *_fast(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    run = cli(["fit", "--config", str(printed)])
    assert run.trainer.global_step == 3


def test_score_then_train_rho1_on_the_offline_reference(tmp_path):
    config = _quickstart_in(tmp_path)
    scores = tmp_path / "ref.safetensors"
    cli(["score", "--config", config, *_fast(tmp_path), f"--output={scores}"])
    assert scores.exists()
    run = cli([
        "fit", "--config", config, *_fast(tmp_path),
        "--model.init_args.reference.mode=offline", f"--model.init_args.reference.scores_file={scores}",
        "--trainer.callbacks+=lightning_tokens.callbacks.ExcessLossSelection",
        "--trainer.callbacks.init_args.ratio=0.5",
    ])
    metrics = run.trainer.callback_metrics
    assert 0.4 < float(metrics["train/ExcessLossSelection/kept_fraction"]) <= 0.6


# ---- user errors: one line, exit status 2; tracebacks for --debug and for the unexpected ---------------
def _bad_dtype(tmp_path):
    return ["fit", "--config", _quickstart_in(tmp_path), *_fast(tmp_path), "--model.init_args.dtype=nonsense"]


def test_a_user_error_prints_one_line_and_exits_2(tmp_path, capsys):
    from lightning_tokens.cli import main

    with pytest.raises(SystemExit) as exited:
        main(_bad_dtype(tmp_path))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lightning-tokens: error: dtype='nonsense' is not a torch dtype; use e.g. bfloat16, float16 or float32."
    assert not any("Traceback" in line for line in err)


def test_debug_and_the_environment_variable_show_the_traceback(tmp_path, monkeypatch):
    from lightning_tokens.cli import DEBUG_ENV, main
    from lightning_tokens.core.errors import ConfigError

    with pytest.raises(BaseException) as raised:  # jsonargparse wraps the error raised in __init__
        main([*_bad_dtype(tmp_path), "--debug"])
    assert not isinstance(raised.value, SystemExit)
    assert "dtype='nonsense'" in repr(raised.value) or isinstance(raised.value.__cause__, ConfigError)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(BaseException) as raised:
        main(_bad_dtype(tmp_path))
    assert not isinstance(raised.value, SystemExit)


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    from lightning_tokens.cli import TokensTrainer, main

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(TokensTrainer, "fit", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fit", "--config", _quickstart_in(tmp_path), *_fast(tmp_path)])


def test_a_malformed_data_line_from_the_command_line(tmp_path):
    """As a user runs it: a fresh process, a data file with a bad line -> one line naming file, line and
    field, status 2, no traceback."""
    import subprocess
    import sys

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": 4}\n')
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"trainer: {{max_steps: 1, logger: false, enable_progress_bar: false, default_root_dir: {tmp_path}}}\n"
        "model: {class_path: lightning_tokens.TokenLM, init_args: {model: tiny-llama, tokenizer: char, "
        "model_config: {num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}}}\n"
        f"data: {{class_path: lightning_tokens.SFTDataModule, init_args: {{train_file: {data}}}}}\n"
    )
    run = subprocess.run([sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", str(config)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("lightning-tokens: error: ") and "bad.jsonl, line 2, field 'response'" in last
    assert "Traceback" not in run.stderr


def test_an_untrusted_checkpoint_is_refused_by_every_subcommand_until_trusted(tmp_path, capsys):
    from lightning_tokens.cli import main
    from tests.modules.test_checkpoints import _malicious_checkpoint

    path, marker = _malicious_checkpoint(tmp_path)
    config = _quickstart_in(tmp_path)
    for command in (["export", "--output", str(tmp_path / "out")], ["fit", *_fast(tmp_path)], ["validate"]):
        with pytest.raises(SystemExit) as exited:
            main([command[0], "--config", config, "--ckpt_path", str(path), *command[1:]])
        assert exited.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "leave_a_mark" in last and "--trust_checkpoint true" in last, last
    assert not marker.exists()
    # trusted: the file is loaded as it is (its payload runs), and export then checks it against the model
    with pytest.raises(SystemExit):
        main(["export", "--config", config, "--ckpt_path", str(path), "--output", str(tmp_path / "out"), "--trust_checkpoint", "true"])
    assert marker.exists()
    assert "does not match the configured model" in capsys.readouterr().err


def test_the_command_silences_only_the_listed_third_party_messages(caplog):
    import logging
    import warnings

    from lightning_tokens.cli import silence_known_third_party_messages

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_third_party_messages()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try ...")
        logger.info("Seed set to 1")
    assert [r.getMessage() for r in caplog.records] == ["Seed set to 1"]


def test_grpo_config_runs_from_an_exported_quickstart(tmp_path):
    """configs/grpo_nupa.yaml as its header says: quickstart fit, export, then GRPO from the export."""
    config = _quickstart_in(tmp_path)
    cli(["fit", "--config", config, *_fast(tmp_path)])
    export = tmp_path / "export"
    cli(["export", "--config", config, *_fast(tmp_path), f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
         f"--output={export}"])
    grpo = tmp_path / "grpo.yaml"
    text = (Path(QUICKSTART).parent / "grpo_nupa.yaml").read_text()
    grpo.write_text(text.replace("runs/quickstart/export", str(export)).replace("runs/grpo_nupa", str(tmp_path / "grpo")))
    run = cli(["fit", "--config", str(grpo), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
               "--trainer.enable_progress_bar=false", "--model.init_args.num_generations=2",
               "--data.init_args.batch_size=2", "--data.init_args.num_train=16", "--data.init_args.num_val=4"])
    metrics = run.trainer.callback_metrics
    assert {"train/reward", "train/loss", "val/exact_match"} <= set(metrics)
    completions = list((tmp_path / "grpo").rglob("completions.jsonl"))
    assert len(completions) == 1 and len(completions[0].read_text().splitlines()) == 2 * 4  # 2 rollouts x 4 samples

    # then the divergence analysis of the README: base = the quickstart export, tuned = the GRPO run's export
    tuned = tmp_path / "grpo_export"
    cli(["export", "--config", str(grpo), f"--ckpt_path={tmp_path / 'grpo' / 'checkpoints' / 'last.ckpt'}", f"--output={tuned}"])
    cli(["divergence", "--config", str(grpo), f"--base={export}", f"--tuned={tuned}", f"--output={tmp_path / 'div'}",
         "--num_prompts=4", "--max_new_tokens=4", "--data.init_args.num_test=4"])
    summary = json.loads((tmp_path / "div" / "summary.json").read_text())
    assert summary["examples"] == 4 and 0 <= summary["mean_js"] <= math.log(2)
    assert {"accuracy_base", "accuracy_tuned", "accuracy_forward", "accuracy_backward", "near_zero_fraction"} <= set(summary)
    assert (tmp_path / "div" / "divergence.png").exists() and (tmp_path / "div" / "tokens.csv").exists()


def _timemaster_fast(tmp_path, name):
    return [
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        f"--output_dir={tmp_path / name}", f"--data.init_args.cache_dir={tmp_path / 'plots'}",
        "--data.init_args.num_train=4", "--data.init_args.num_val=2", "--data.init_args.num_test=2",
        "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
    ]


def test_timemaster_recipe_sft_export_grpo_and_the_numeric_ablation(tmp_path):
    """configs/timemaster_*.yaml as their headers say: SFT on plots, export, GRPO from the export (reference:
    the frozen SFT model), test; and the numeric-input ablation."""
    configs = Path(QUICKSTART).parent
    small = ["--model.init_args.model_config={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}",
             "--model.init_args.vision.image_size=64"]
    sft = cli(["fit", "--config", str(configs / "timemaster_sft.yaml"), *_timemaster_fast(tmp_path, "sft"), *small])
    assert {"val/accuracy", "val/format"} <= set(sft.trainer.callback_metrics)
    export = tmp_path / "sft" / "export"
    cli(["export", "--config", str(configs / "timemaster_sft.yaml"), *_timemaster_fast(tmp_path, "sft"), *small,
         f"--ckpt_path={tmp_path / 'sft' / 'checkpoints' / 'last.ckpt'}", f"--output={export}"])
    assert (export / "connector.safetensors").exists()
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text((configs / "timemaster_grpo.yaml").read_text().replace("runs/timemaster_sft/export", str(export)))
    run = cli(["fit", "--config", str(grpo), *_timemaster_fast(tmp_path, "grpo"), "--model.init_args.vision.image_size=64",
               "--model.init_args.num_generations=2", "--model.init_args.max_completion_length=8"])
    metrics = run.trainer.callback_metrics
    assert {"train/reward", "train/kl", "train/rewards/timemaster/mean", "val/accuracy"} <= set(metrics)
    lines = next((tmp_path / "grpo").rglob("completions.jsonl")).read_text().splitlines()
    assert all(0.0 <= json.loads(line)["timemaster"] <= 1.0 for line in lines)
    test = cli(["test", "--config", str(grpo), *_timemaster_fast(tmp_path, "grpo_test"), "--model.init_args.vision.image_size=64",
                f"--ckpt_path={tmp_path / 'grpo' / 'checkpoints' / 'last.ckpt'}"])
    assert "test/accuracy" in test.trainer.callback_metrics
    numeric = cli(["fit", "--config", str(configs / "timemaster_numeric.yaml"), *_timemaster_fast(tmp_path, "numeric"),
                   "--model.init_args.model_config={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, max_position_embeddings: 2048}"])
    assert "val/accuracy" in numeric.trainer.callback_metrics
