"""``benchmarks/speech_speed.py``: the paired-ratio summary on hand-made times, the utterances it times, and
one tiny end-to-end run (rows, the feature cache's identical training, the LM loss check, JSON)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speech_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("speech_speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    wait_policy = os.environ.get("OMP_WAIT_POLICY")  # the script sets it for its own process
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        if wait_policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = wait_policy


def test_summary_is_the_median_of_paired_ratios(bench):
    base = bench.Case("lm", "hf", lambda: 0.0, times=[1.0, 2.0, 1.0, 2.0, 4.0], losses=[3.0, 2.5])
    ours = bench.Case("lm", "ours", lambda: 0.0, "hf", times=[2.0, 3.0, 3.0, 5.0, 4.0], losses=[3.0, 2.0])
    rows = {row["name"]: row for row in bench.summarize([base, ours])}
    # ratios 2, 1.5, 3, 2.5, 1 -> median 2 (the ratio of the medians would be 3 / 2)
    assert rows["ours"]["ratio"] == 2.0 and rows["ours"]["step_s"] == 3.0
    assert rows["hf"]["ratio"] is None and rows["hf"]["step_s"] == 2.0
    assert (rows["ours"]["first_loss"], rows["ours"]["last_loss"]) == (3.0, 2.0)


def test_noise_utterances_have_the_asked_length_and_cycle_the_tasks(bench):
    records = bench.utterances(5, 0.25, "noise", seed=3)
    assert [len(r["audio"]) for r in records] == [4000] * 5
    assert [r["task"] for r in records] == ["asr", "tts", "sqa", "tts", "asr"]
    assert torch.equal(records[0]["audio"], bench.utterances(1, 0.25, "noise", seed=3)[0]["audio"])
    batch = bench.tokenizer_batch(records, "cpu")
    assert batch["audio"].shape == (5, 4000) and batch["audio_lengths"].tolist() == [4000] * 5
    assert batch["task"] == ["asr"] * 5  # every record trains the understanding CE
    raw = bench.dual_batch(records, codebook=16, rate=24000, device="cpu")
    assert raw["audio"].shape == (5, 6000)  # resampled to the codec's rate
    assert all(t.shape == (6,) and int(t.max()) < 16 for t in raw["speech_tokens"])  # 25 per second


def test_data_utterances_are_cropped_or_repeated(bench, tmp_path, monkeypatch):
    import soundfile

    (tmp_path / "wavs").mkdir()
    lines = []
    for i, samples in enumerate((1000, 9000)):
        soundfile.write(tmp_path / "wavs" / f"u{i}.wav", np.arange(samples, dtype=np.float32) / 1e4, 16000)
        lines.append(json.dumps({"id": f"u{i}", "audio": f"wavs/u{i}.wav", "text": f"word {i}", "task": "tts"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(bench, "DATA", tmp_path)
    short, long = bench.utterances(2, 0.25, "auto")
    assert len(short["audio"]) == len(long["audio"]) == 4000
    assert short["text"] == "word 0" and short["task"] == "asr"  # tasks cycle, whatever the file says
    torch.testing.assert_close(short["audio"][1000:2000], short["audio"][:1000], rtol=0, atol=1e-4)
    torch.testing.assert_close(long["audio"], torch.arange(4000) / 1e4, rtol=0, atol=1e-4)
    with pytest.raises(SystemExit, match="has 2 records"):
        bench.utterances(3, 0.25, "data")


def test_bad_arguments(bench):
    for argv in (["--steps", "0"], ["--warmup", "0"], ["--parts", "tokenizer,vision"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_tiny_run_end_to_end(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "speech.json"
    try:
        result = bench.main(["--batch", "2", "--seconds", "0.5", "--codebook", "16", "--steps", "1", "--repeats", "2",
                             "--warmup", "2", "--audio", "noise", "--no-real-whisper", "--threads", "1",
                             "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    rows = {row["name"]: row for row in result["rows"]}
    a = "(a) tiny-whisper + tiny-llama, uw 5"
    assert list(rows) == [a, a + ", feature cache", "DualSpeechLM, acoustic=None",
                          "DualSpeechLM + acoustic decoder (tiny-encodec)", "LM step, `labels=` loss", "LM step, token loss"]
    assert all(len(row["times"]) == 2 and row["step_s"] > 0 for row in rows.values())
    assert rows[a + ", feature cache"]["baseline"] == a and rows[a + ", feature cache"]["ratio"] > 0
    assert rows["LM step, token loss"]["ratio"] > 0
    # the cached features are the encoder's: the cached model trains exactly as the uncached one
    assert rows[a + ", feature cache"]["first_loss"] == pytest.approx(rows[a]["first_loss"], rel=1e-6)
    assert rows[a + ", feature cache"]["last_loss"] == pytest.approx(rows[a]["last_loss"], rel=1e-6)
    assert rows[a]["last_loss"] != rows[a]["first_loss"]  # the steps did train
    # the two LM losses compared are the same number (same batch, same weights)
    check = result["loss_check"]
    assert math.isfinite(check["hf_loss"]) and check["token_loss"] == pytest.approx(check["hf_loss"], rel=1e-5)
    assert "whisper-tiny.en rows skipped: --no-real-whisper" in printed
    assert f"device: {result['device']}" in printed and "audio: noise" in printed and "| tokenizer | " + a + " |" in printed
    assert "target token loss / `labels=` loss ≤ 1.02" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["args"]["batch"] == 2
