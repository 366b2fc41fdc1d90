"""Do speech tokens keep what was said? Whisper transcribes the features a SpeechTokenizer reconstructs from its
own tokens.

For each validation utterance the frozen Whisper tiny.en encoder gives features (50 Hz); a tokenizer turns
them into 25 Hz tokens and reconstructs the features from the tokens alone; Whisper's own decoder then
transcribes (greedy, first sentence, at most two tokens a reference word) (a) the original features and (b) each tokenizer's reconstruction, both
cropped to the utterance and zero beyond it. The table gives the CER against the reference text, the feature
MSE and cosine similarity of the reconstruction, and codebook use. Numbers spoken as words come back from
Whisper as digits, so only the sentence utterances (three words or more, no number) are scored.

    python benchmarks/speech_resynthesis.py --data data/speech/val.jsonl \
        --tokenizer understanding=runs/speech_tokenizer/checkpoints/last.ckpt \
        --tokenizer reconstruction-only=runs/speech_tokenizer_recon/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_tokens.datamodules.speech import load_audio, read_speech_manifest  # noqa: E402
from lightning_tokens.metrics.speech import char_error_rate, normalize_transcript  # noqa: E402
from lightning_tokens.models.whisper import load_whisper  # noqa: E402
from lightning_tokens.modules.speech import SpeechTokenizer  # noqa: E402

NUMBER_WORDS = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|teen|ty|hundred|zero)\b|ty\b|teen\b")


def first_sentence(text: str) -> str:
    """Whisper on short windows repeats itself: keep the first sentence."""
    text = text.strip()
    end = re.search(r"[.!?]", text)
    return text[: end.start()] if end else text


def load_tokenizer(path: str) -> SpeechTokenizer:
    """A trained tokenizer for encoding and decoding only (its frozen LM is not loaded)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    settings = dict(checkpoint["hyper_parameters"])
    settings.update(understanding_weight=0.0, feature_cache_size=0)
    model = SpeechTokenizer(**{k: v for k, v in settings.items() if not k.startswith("_")})
    model.configure_model()
    weights = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(("to_llm.", "llm_conv."))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(("whisper_encoder.",)) for k in missing), (missing, unexpected)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/speech/val.jsonl")
    parser.add_argument("--tokenizer", action="append", required=True, help="name=checkpoint, repeatable")
    parser.add_argument("--max_utterances", type=int, default=40)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizers = {name: load_tokenizer(path) for name, path in (item.split("=", 1) for item in args.tokenizer)}
    positions = next(iter(tokenizers.values())).encoder_frames
    whisper, processor = load_whisper("whisper-tiny.en", max_source_positions=positions)
    from transformers.modeling_outputs import BaseModelOutput

    records = [r for r in read_speech_manifest(args.data) if len(r["text"].split()) >= 3 and not NUMBER_WORDS.search(r["text"])]
    records = records[: args.max_utterances]

    whisper.generation_config.max_length = None  # max_new_tokens below

    def transcribe(features: torch.Tensor, frames: int, words: int) -> str:
        canvas = torch.zeros(1, positions, features.shape[-1])
        canvas[0, :frames] = features[:frames]
        # a budget of two tokens a word (of the reference): short windows make Whisper loop, not stop
        out = whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=canvas), max_new_tokens=2 * words + 2)
        return first_sentence(processor.tokenizer.decode(out[0], skip_special_tokens=True))

    truth, heard = [], {"original": []}
    stats = {name: {"mse": [], "cos": [], "codes": set()} for name in tokenizers}
    heard.update({name: [] for name in tokenizers})
    examples = []
    with torch.no_grad():
        for record in records:
            wav = load_audio(record["audio"], 16000)
            lengths = torch.tensor([len(wav)])
            any_tokenizer = next(iter(tokenizers.values()))
            features, frames = any_tokenizer.whisper_features(wav[None], lengths)
            n = int(frames[0])
            truth.append(record["text"])
            words = len(record["text"].split())
            heard["original"].append(transcribe(features[0], n, words))
            row = {"text": record["text"], "original": heard["original"][-1]}
            for name, tokenizer in tokenizers.items():
                codes = tokenizer.encode(wav, 16000)[0]
                recon = tokenizer.decode_features([codes])[0][:n]
                stats[name]["mse"].append(float(((recon - features[0, :n]) ** 2).mean()))
                stats[name]["cos"].append(float(torch.nn.functional.cosine_similarity(recon, features[0, :n], dim=-1).mean()))
                stats[name]["codes"].update(codes.tolist())
                heard[name].append(transcribe(recon, n, words))
                row[name] = heard[name][-1]
            examples.append(row)
    print(f"{len(records)} sentence utterances of {args.data}; Whisper tiny.en, {positions / 50:g} s windows, greedy\n")
    print("| features Whisper transcribes | CER | feature MSE | cosine | codes used |")
    print("|---|---|---|---|---|")
    print(f"| original (frozen encoder) | {char_error_rate(heard['original'], truth):.3f} | – | – | – |")
    rows = [{"name": "original", "cer": float(char_error_rate(heard["original"], truth))}]
    for name, tokenizer in tokenizers.items():
        s = stats[name]
        cer = char_error_rate(heard[name], truth)
        mse, cos = sum(s["mse"]) / len(s["mse"]), sum(s["cos"]) / len(s["cos"])
        print(f"| {name} tokens → reconstruction | {cer:.3f} | {mse:.3f} | {cos:.3f} | {len(s['codes'])} / {tokenizer.codebook_size} |")
        rows.append({"name": name, "cer": float(cer), "mse": mse, "cosine": cos, "codes_used": len(s["codes"])})
    print("\nexamples (reference | original | " + " | ".join(tokenizers) + "):")
    for row in examples[:6]:
        print("  " + " | ".join(repr(normalize_transcript(row[key])) for key in ["text", "original", *tokenizers]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "examples": examples}, indent=2))


if __name__ == "__main__":
    main()
