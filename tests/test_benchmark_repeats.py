"""``benchmarks/token_loss.py --repeats N``: the paired-ratio summary on hand-made numbers, and one short
end-to-end run with child processes."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "token_loss.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("token_loss_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(step_s, peak_gib=float("nan")):
    return {"step_s": step_s, "peak_gib": peak_gib}


def test_summary_is_the_median_of_paired_ratios(bench):
    # the variant is 2x, 1.5x, 3x, 2.5x, 1x its baseline in rounds 1..5, while the machine drifts
    base = [1.0, 2.0, 1.0, 2.0, 4.0]
    var = [2.0, 3.0, 3.0, 5.0, 4.0]
    rounds = [{"hf_loss": _run(b, 10.0), "token_lm": _run(v, 5.0 * (i + 1))} for i, (b, v) in enumerate(zip(base, var))]
    rows = {row["variant"]: row for row in bench.summarize_rounds(rounds, {"hf_loss": "hf_loss", "token_lm": "hf_loss"})}

    row = rows["token_lm"]
    assert (row["n"], row["rounds"], row["failures"], row["failed"]) == (5, 5, 0, None)
    assert row["step_s"] == 3.0  # median of the variant's own step times
    t = row["time_ratio"]  # ratios 2, 1.5, 3, 2.5, 1 -> sorted 1, 1.5, 2, 2.5, 3
    assert (t["median"], t["min"], t["max"], t["q1"], t["q3"]) == (2.0, 1.0, 3.0, 1.5, 2.5)
    # not the ratio of medians (3 / 2 = 1.5): pairing removes the drift
    m = row["mem_ratio"]  # 0.5, 1.0, 1.5, 2.0, 2.5
    assert (m["median"], m["min"], m["max"], m["q1"], m["q3"]) == (1.5, 0.5, 2.5, 1.0, 2.0)
    assert row["peak_gib"] == 15.0

    base_row = rows["hf_loss"]
    assert base_row["time_ratio"]["median"] == 1.0 and base_row["time_ratio"]["max"] == 1.0


def test_memory_ratios_are_nan_on_cpu_and_printed_as_na(bench, capsys):
    rounds = [{"hf_loss": _run(1.0), "dft": _run(1.2)}, {"hf_loss": _run(2.0), "dft": _run(2.2)}]
    rows = bench.summarize_rounds(rounds, {"dft": "hf_loss", "hf_loss": "hf_loss"})
    assert [row["variant"] for row in rows] == ["dft", "hf_loss"]  # the order given
    assert math.isclose(rows[0]["time_ratio"]["median"], (1.2 + 1.1) / 2)
    assert all(math.isnan(v) for v in rows[0]["mem_ratio"].values())
    assert math.isnan(rows[0]["peak_gib"])
    bench.print_summary(rows)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dft |"))
    assert "n/a | n/a–n/a | n/a–n/a" in line


def test_failed_runs(bench, capsys):
    rounds = [
        {"hf_loss": _run(1.0), "token_lm": _run(1.1), "qtuning": {"failed": "RuntimeError: boom 1"}},
        {"hf_loss": {"failed": "MemoryError"}, "token_lm": _run(1.5), "qtuning": {"failed": "RuntimeError: boom 2"}},
        {"hf_loss": _run(2.0), "token_lm": _run(2.6), "qtuning": {"failed": "RuntimeError: boom 3"}},
    ]
    rows = {r["variant"]: r for r in bench.summarize_rounds(
        rounds, {"hf_loss": "hf_loss", "token_lm": "hf_loss", "qtuning": "hf_loss"})}

    # every run of qtuning failed: no numbers, the last error
    q = rows["qtuning"]
    assert (q["n"], q["rounds"], q["failures"], q["failed"]) == (0, 3, 3, "RuntimeError: boom 3")
    assert math.isnan(q["step_s"]) and math.isnan(q["time_ratio"]["median"])
    # the baseline failed in round 2: token_lm's round 2 has no pair, its own step time still counts
    t = rows["token_lm"]
    assert (t["n"], t["rounds"], t["failures"]) == (2, 3, 0)
    assert t["step_s"] == 1.5
    assert math.isclose(t["time_ratio"]["median"], (1.1 + 1.3) / 2)
    assert math.isclose(t["time_ratio"]["min"], 1.1) and math.isclose(t["time_ratio"]["max"], 1.3)
    assert rows["hf_loss"]["failures"] == 1 and rows["hf_loss"]["n"] == 2

    bench.print_summary(list(rows.values()))
    out = capsys.readouterr().out
    assert "| qtuning | 0/3 | failed: RuntimeError: boom 3 |" in out
    assert "| token_lm | 2/3 | 1.5000 |" in out
    assert "hf_loss: 1 of 3 runs failed, last: MemoryError" in out


def test_spread_of_one_value_and_of_none(bench):
    assert bench.spread([1.25]) == {"median": 1.25, "min": 1.25, "max": 1.25, "q1": 1.25, "q3": 1.25}
    assert all(math.isnan(v) for v in bench.spread([]).values())


def test_baselines_are_added_and_rounds_interleaved(bench):
    names, added = bench.with_baselines(["token_lm", "sstoken_offline", "dft:torch"])
    assert added == ["hf_loss", "rho1_offline"]  # sstoken_offline -> rho1_offline -> hf_loss
    assert names == ["token_lm", "sstoken_offline", "dft:torch", "hf_loss", "rho1_offline"]
    assert bench.with_baselines(["hf_loss", "token_lm"]) == (["hf_loss", "token_lm"], [])
    orders = [bench.round_order(names, r) for r in range(1, 6)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert orders[0] == bench.round_order(names, 1)  # seeded by the round
    assert len({tuple(order) for order in orders}) > 1


@pytest.mark.slow
def test_repeats_end_to_end(tmp_path):
    """Two rounds, one child process per run (the baselines' addition and the ratios are checked above on
    hand-made numbers; here the processes, their JSON and the summary)."""
    out = tmp_path / "result.json"
    command = [
        sys.executable, str(SCRIPT), "--repeats", "2", "--variants", "hf_loss", "--steps", "2", "--warmup", "1",
        "--batch", "1", "--seq", "32", "--vocab", "256", "--device", "cpu",
        "--workdir", str(tmp_path / "work"), "--json", str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| hf_loss | 2/2 |" in proc.stdout

    data = json.loads(out.read_text())
    assert data["added_baselines"] == []
    assert [entry["round"] for entry in data["rounds"]] == [1, 2]
    for entry in data["rounds"]:
        assert set(entry["results"]) == {"hf_loss"}
        assert all("failed" not in result for result in entry["results"].values())
        assert entry["results"]["hf_loss"]["step_s"] > 0
    row = next(row for row in data["summary"] if row["variant"] == "hf_loss")
    assert row["n"] == 2 and row["time_ratio"]["median"] == 1.0
