"""ReTok throughput and the image-code generator's step against the model's own ``labels=`` loss.

Four measurements, each the median of interleaved rounds after a warm-up:
  tokenizer_train   FlexibleImageTokenizer training steps (forward, backward, AdamW), images/s
  with_patchgan     the same with the PatchGAN option (discriminator losses, adaptive weight), images/s and
                    the median paired step-time ratio to tokenizer_train
  encode_decode     ``decode(encode(images, k))`` at k = N, images/s (no grad)
  generator         one optimizer step of a causal LM over class + code rows:
                      hf_loss     ``causal_lm(input_ids, labels=labels).loss`` (full logits)
                      token_loss  ``TokenLM`` (final hidden states + the fused chunked token loss)  (baseline: hf_loss)
                    reported as the median paired ratio token_loss / hf_loss (target ≤ 1.02).

    python benchmarks/retok_speed.py --device cpu                  # about a minute on 2 cores
    python benchmarks/retok_speed.py --device cuda --preset sb256 --batch 32 --codebook 16384 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def tokenizer_rates(args: argparse.Namespace) -> dict[str, float]:
    from lightning_tokens.layers.adversarial import AdversarialSettings
    from lightning_tokens.modules.image_tokenizer import FlexibleImageTokenizer

    def build(adversarial: AdversarialSettings | None) -> FlexibleImageTokenizer:
        torch.manual_seed(0)
        options = dict(semantic_teacher=None, perceptual_weight=0.0, adversarial=adversarial)
        return FlexibleImageTokenizer(preset=args.preset, **options).to(args.device).train()

    tok, gan = build(None), build(AdversarialSettings())
    size = tok.size.image_size
    images = torch.rand(args.batch, 3, size, size, device=args.device)
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (tok, gan)}

    def train_step(module: FlexibleImageTokenizer) -> None:
        losses = module.training_loss(images)
        optimizer = optimizers[id(module)]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    def round_trip() -> None:
        with torch.no_grad():
            tok.decode(tok.encode(images, num_tokens=tok.num_tokens))

    train_step(tok), train_step(gan)
    tok.eval()
    round_trip()
    train_times, gan_times, ratios, codec_times = [], [], [], []
    for _ in range(args.rounds):
        tok.train()
        train_times.append(_timed(lambda: train_step(tok), args.device))
        gan_times.append(_timed(lambda: train_step(gan), args.device))
        ratios.append(gan_times[-1] / train_times[-1])
        tok.eval()
        codec_times.append(_timed(round_trip, args.device))
    return {
        "train": args.batch / statistics.median(train_times), "gan": args.batch / statistics.median(gan_times),
        "gan_ratio": statistics.median(ratios), "codec": args.batch / statistics.median(codec_times),
    }


def generator_ratio(args: argparse.Namespace) -> tuple[float, float, float]:
    from lightning_tokens.datamodules.image_codes import build_code_tokenizer
    from lightning_tokens.modules.causal_lm import TokenLM

    import tempfile

    folder = tempfile.mkdtemp()
    build_code_tokenizer(10, args.codebook).save_pretrained(folder)
    config = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=max(args.hidden // 64, 2), num_key_value_heads=max(args.hidden // 64, 2))
    model = TokenLM(model="tiny-llama", tokenizer=folder, model_config=config, generate_in_validation=False)
    model.configure_model()
    model.to(args.device).train()
    vocab = model.causal_lm.get_input_embeddings().weight.shape[0]
    rows = torch.randint(vocab - args.codebook, vocab, (args.batch, args.tokens + 1), device=args.device)
    labels = rows.clone()
    labels[:, 0] = -100
    batch = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(loss_fn) -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    hf = lambda: model.causal_lm(input_ids=rows, attention_mask=batch["attention_mask"], labels=labels).loss  # noqa: E731
    ours = lambda: model._loss(batch)  # noqa: E731
    step(hf), step(ours)
    hf_times, our_times, ratios = [], [], []
    for _ in range(args.rounds):
        a = _timed(lambda: step(hf), args.device)
        b = _timed(lambda: step(ours), args.device)
        hf_times.append(a)
        our_times.append(b)
        ratios.append(b / a)
    return statistics.median(hf_times), statistics.median(our_times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rates = tokenizer_rates(args)
    hf_s, ours_s, ratio = generator_ratio(args)
    print(f"\ndevice: {name}; preset {args.preset}, batch {args.batch}, {args.rounds} rounds (medians)\n")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| tokenizer training | {rates['train']:.1f} images/s |")
    print(f"| tokenizer training + PatchGAN | {rates['gan']:.1f} images/s |")
    print(f"| PatchGAN step-time ratio (median paired) | {rates['gan_ratio']:.3f} |")
    print(f"| encode + decode (k = N) | {rates['codec']:.1f} images/s |")
    print(f"| generator step, `labels=` loss | {hf_s * 1000:.1f} ms |")
    print(f"| generator step, token loss | {ours_s * 1000:.1f} ms |")
    print(f"| generator ratio token / `labels=` (median paired) | {ratio:.3f} |")


if __name__ == "__main__":
    main()
