"""Vision-language training step: the library's fused token loss against the model's own ``labels=`` loss.

Both variants run the same model (built from config, random weights) on the same batch of images and
questions from its processor, and take a full optimizer step (forward, backward, AdamW):
  hf_loss     ``model(**inputs, labels=labels).loss`` (full ``(tokens × vocab)`` logits, float32 upcast)
  token_loss  ``VisionLanguageLM`` (final hidden states + the fused chunked token loss)   (baseline: hf_loss)
for the Hugging Face path (a Qwen2-VL config) and the GVT composition (MobileNetV2 → resampler → a Llama
config). Rounds interleave the variants; the table gives median step times and the median paired ratio,
plus peak memory on CUDA.

    python benchmarks/vlm_loss.py --device cpu                       # minutes on 2 cores
    python benchmarks/vlm_loss.py --device cuda --vocab 151936 --hidden 1536 --layers 8 --batch 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from PIL import Image

from lightning_tokens.modules.vision_language import ResamplerSettings, VisionLanguageLM, VisionSettings


def build(path: str, args: argparse.Namespace) -> VisionLanguageLM:
    text = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=max(args.hidden // 64, 2), num_key_value_heads=max(args.hidden // 128, 1))
    if path == "hf":
        model = VisionLanguageLM(model="tiny-qwen2-vl", train_language_model=True,
                                 model_config={"text_config": {**text, "vocab_size": args.vocab}})
    else:
        model = VisionLanguageLM(model="tiny-llama", tokenizer="char", train_language_model=True,
                                 model_config={**text, "vocab_size": args.vocab},
                                 vision=VisionSettings(pretrained=False, image_size=args.image_size),
                                 resampler=ResamplerSettings(num_latents=32, depth=2, heads=8, dim_head=64))
    model.configure_model()
    return model.to(args.device)


def batch_for(model: VisionLanguageLM, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(args.image_size, args.image_size, 3, generator=generator) * 255).byte().numpy())
              for _ in range(args.batch)]
    questions = [f"Question {i}: how many circles are there in the image? " * args.repeat_question for i in range(args.batch)]
    answers = [f"There are {i % 7} circles. " * args.repeat_answer for i in range(args.batch)]
    batch = model.processor(images, questions, answers)
    return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def hf_loss(model: VisionLanguageLM, batch: dict) -> torch.Tensor:
    if model.is_hf_vision_language_model:
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        return model.causal_lm(**{k: batch[k] for k in keys}, labels=batch["labels"]).loss
    embeds = model.input_embeddings(batch["input_ids"], batch["pixel_values"])
    return model.causal_lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def step_time(model: VisionLanguageLM, batch: dict, variant: str, optimizer: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = hf_loss(model, batch) if variant == "hf_loss" else model._loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paths", default="hf,gvt")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeat-question", type=int, default=2)
    parser.add_argument("--repeat-answer", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    print(f"device: {device_name}; vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, batch {args.batch}")
    print("| path | variant | tokens/batch | median step (s) | ratio to hf_loss (median, min–max) | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for path in args.paths.split(","):
        torch.manual_seed(0)
        model = build(path, args)
        batch = batch_for(model, args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        times: dict[str, list[float]] = {"hf_loss": [], "token_loss": []}
        peaks: dict[str, float] = {}
        for round_index in range(args.warmup + args.rounds):
            for variant in (("hf_loss", "token_loss") if round_index % 2 == 0 else ("token_loss", "hf_loss")):
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                elapsed = step_time(model, batch, variant, optimizer, args.device)
                if args.device == "cuda":
                    peaks[variant] = max(peaks.get(variant, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                if round_index >= args.warmup:
                    times[variant].append(elapsed)
        ratios = [t / h for t, h in zip(times["token_loss"], times["hf_loss"])]
        tokens = int(batch["attention_mask"].sum())
        for variant in ("hf_loss", "token_loss"):
            ratio = "1.00" if variant == "hf_loss" else f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
            peak = f"{peaks[variant]:.2f}" if peaks else "n/a"
            print(f"| {path} | {variant} | {tokens} | {statistics.median(times[variant]):.3f} | {ratio} | {peak} |")
        del model, optimizer


if __name__ == "__main__":
    main()
