"""DualSpeechLM: one causal LM over text and understanding-driven speech tokens, with an acoustic decoder
(DualSpeechLM, arXiv 2508.08961; reference ``lavendery/UUG``).

- Understanding (``asr``, ``sqa``): speech tokens inline in the prompt, text labels.
- Generation (``tts``): the LM's labels are the target speech's tokens (semantic supervision); an acoustic
  decoder (:class:`~lightning_tokens.layers.prefix_lm.AcousticGPT`, a causal GPT with a prefix-LM mask)
  conditioned on an adapter of the LM's hidden states predicts the audio codec's tokens.
- ``loss = CE_LM + acoustic.weight · CE_acoustic``, both through the library's token loss (the acoustic
  one as the second stream ``acoustic``), so token methods apply to text, speech-token and acoustic-token
  positions alike.
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.stats import IGNORE_INDEX
from lightning_tokens.metrics.speech import NormalizedCharErrorRate, NormalizedWordErrorRate, normalize_transcript
from lightning_tokens.models.tokenizers import bos_prefix
from lightning_tokens.modules.causal_lm import TokenLM
from lightning_tokens.modules.frozen_cache import WaveformCache
from lightning_tokens.modules.speech.formatting import (
    DEFAULT_INSTRUCTIONS,
    GENERATION_TASKS,
    UNDERSTANDING_TASKS,
    SpeechVocabulary,
    collate_speech_examples,
    extend_tokenizer,
    format_speech_example,
)

__all__ = ["AcousticSettings", "DualSpeechLM", "SpeechSampling", "condition_choice"]

# the module formats the datamodule's raw batches in `on_after_batch_transfer` on purpose (the tokenizer is the
# model's); Lightning's notice that the module's hook is used rather than the datamodule's says nothing useful
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")

#: Validation prints this many ASR transcripts beside their references.
SHOWN_TRANSCRIPTS = 5

#: Chain-of-Condition choices: the acoustic decoder sees the question, the answer, or both.
CONDITIONS = ("question", "answer", "both")


@dataclass
class AcousticSettings:
    """The acoustic decoder and its codec.

    Attributes:
        codec: ``tiny-encodec`` / ``tiny-mimi`` / ``tiny-dac`` (built from config) or a local folder / hub id
            of a transformers ``EncodecModel``, ``MimiModel`` or ``DacModel`` (see
            :func:`~lightning_tokens.models.codecs.load_codec`); its first codebook is the acoustic vocabulary.
        n_embd, n_layer, n_head, block_size, dropout: the decoder GPT's size.
        speaker_dim: size of a per-utterance speaker embedding (batch ``speaker_embedding``), ``None`` for none.
        weight: weight of the acoustic cross-entropy (1.0: the reference's 1:1).
        cache_size: keep the frozen codec's tokens of up to this many utterances in memory (keyed by the
            waveform's bytes), so later epochs skip the codec: the same tokens. ``0``: no cache.
    """

    codec: str = "tiny-encodec"
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 2048
    dropout: float = 0.0
    speaker_dim: int | None = None
    weight: float = 1.0
    cache_size: int = 0


@dataclass
class SpeechSampling:
    """Inference settings (the reference's defaults).

    Attributes:
        temperature, top_p: sampling of the speech tokens by the LM.
        acoustic_temperature, acoustic_top_p: sampling of the codec tokens by the acoustic decoder.
        max_speech_tokens: most speech tokens per utterance (25 per second).
        max_acoustic_tokens: most codec tokens per utterance (``None``: the acoustic decoder's ``block_size``; the
            reference samples up to 1200, 30 s at its 40 per second).
        seed: seed of the sampling.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    acoustic_temperature: float = 1.0
    acoustic_top_p: float = 0.5
    max_speech_tokens: int = 250
    max_acoustic_tokens: int | None = None
    seed: int = 0


# the settings travel in checkpoints' hyper-parameters: loadable under weights_only
torch.serialization.add_safe_globals([AcousticSettings, SpeechSampling])


def condition_choice(seed: int, step: int, example_id: str, probabilities: tuple[float, float, float] = (0.33, 0.33, 0.34)) -> str:
    """Chain-of-Condition's draw for one example: ``question``, ``answer`` or ``both`` with
    ``probabilities`` (the reference's thresholds 0.33 and 0.66).

    The draw is a function of ``(seed, optimizer step, example id)`` alone (a counter-based generator), so
    a resumed run and any number of ranks draw exactly as one uninterrupted process; nothing needs saving.

    Example:
        >>> condition_choice(0, 5, "utt-1") == condition_choice(0, 5, "utt-1")
        True
        >>> sorted({condition_choice(0, s, "x") for s in range(200)})
        ['answer', 'both', 'question']
    """
    key = zlib.crc32(f"{seed}:{step}:{example_id}".encode())
    u = float(torch.rand((), generator=torch.Generator().manual_seed(key)))
    if u < probabilities[0]:
        return "question"
    return "answer" if u < probabilities[0] + probabilities[1] else "both"


class DualSpeechLM(TokenLM):
    """A :class:`TokenLM` whose vocabulary holds the speech tokens of a
    :class:`~lightning_tokens.modules.speech.SpeechTokenizer`, plus an acoustic decoder for speech output.

    Batches come from :class:`~lightning_tokens.datamodules.speech.SpeechDataModule` with ``speech_tokens``
    (written by ``lightning-tokens speech_tokens``) and ``audio`` at the codec's sample rate; the module
    formats them (:mod:`~lightning_tokens.modules.speech.formatting`) before the token methods run.

    Args:
        speech_codebook_size: ``K``, the speech tokenizer's codebook size; the vocabulary gains ``<a_0>`` …
            ``<a_{K-1}>``, ``<audio>``, ``</audio>`` (new embedding and head rows; with ``lora`` set, the
            embeddings and head train in full beside the adapters).
        acoustic: the acoustic decoder; ``None`` for understanding only (``tts`` rows then train the LM's
            speech tokens alone).
        chain_of_condition: draw the acoustic condition per example (question / answer / both with
            ``condition_probabilities``); ``False`` always conditions on both.
        condition_probabilities: probabilities of question-only, answer-only, both.
        condition_seed: seed of the draws (see :func:`condition_choice`).
        instructions: per-task instruction text (default :data:`DEFAULT_INSTRUCTIONS`).
        sampling: inference settings.
        prediction_dir: folder for the WAV files ``predict`` writes (default ``<default_root_dir>/speech``).
        **kwargs: :class:`TokenLM`'s arguments (``model``, ``tokenizer``, ``lora``, ``optimizer``...).

    Example::

        model = DualSpeechLM(model="tiny-llama", tokenizer="char", speech_codebook_size=64)
        trainer = L.Trainer(max_steps=200, callbacks=[DFT()])
        trainer.fit(model, datamodule=SpeechDataModule("runs/speech_tokens/train.jsonl", sample_rate=24000))
    """

    def __init__(
        self,
        speech_codebook_size: int = 1024,
        acoustic: AcousticSettings | None = None,
        chain_of_condition: bool = True,
        condition_probabilities: tuple[float, float, float] = (0.33, 0.33, 0.34),
        condition_seed: int = 0,
        instructions: dict[str, str] | None = None,
        sampling: SpeechSampling | None = None,
        prediction_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # inference options are not part of the trained model: kept out of the checkpoint's hyper-parameters,
        # so that `predict --ckpt_path ...` honours the values given at prediction time
        for name in ("sampling", "prediction_dir"):
            self.hparams.pop(name, None)
            self._hparams_initial.pop(name, None)
        if speech_codebook_size < 1:
            raise ConfigError(f"DualSpeechLM(speech_codebook_size={speech_codebook_size}): must be >= 1.")
        if len(condition_probabilities) != 3 or min(condition_probabilities) < 0 or abs(sum(condition_probabilities) - 1) > 1e-6:
            raise ConfigError(
                f"DualSpeechLM(condition_probabilities={tuple(condition_probabilities)}): three non-negative "
                "probabilities (question, answer, both) that sum to 1, e.g. [0.33, 0.33, 0.34]."
            )
        if acoustic is not None and acoustic.weight < 0:
            raise ConfigError(f"DualSpeechLM(acoustic.weight={acoustic.weight}): must be >= 0.")
        sampling = sampling or SpeechSampling()
        budget = sampling.max_acoustic_tokens
        if acoustic is not None and budget is not None and not 1 <= budget <= acoustic.block_size:
            raise ConfigError(
                f"DualSpeechLM(sampling.max_acoustic_tokens={sampling.max_acoustic_tokens}) must lie in 1 … "
                f"acoustic.block_size={acoustic.block_size}: lower it (75 codec tokens a second with EnCodec) or "
                "raise acoustic.block_size."
            )
        self.codec_cache = WaveformCache(acoustic.cache_size if acoustic else 0, "DualSpeechLM(acoustic.cache_size)")
        self.speech_codebook_size = speech_codebook_size
        self.acoustic_settings = acoustic
        self.chain_of_condition = chain_of_condition
        self.condition_probabilities = tuple(float(p) for p in condition_probabilities)
        self.condition_seed = condition_seed
        self.instructions = {**DEFAULT_INSTRUCTIONS, **(instructions or {})}
        self.sampling = sampling or SpeechSampling()
        self.prediction_dir = prediction_dir
        self.acoustic_decoder: torch.nn.Module | None = None
        self.val_acoustic_loss = MeanMetric()
        self.test_acoustic_loss = MeanMetric()
        self.val_cer, self.val_wer = NormalizedCharErrorRate(), NormalizedWordErrorRate()
        self.test_cer, self.test_wer = NormalizedCharErrorRate(), NormalizedWordErrorRate()
        self.val_sqa_accuracy, self.test_sqa_accuracy = MeanMetric(), MeanMetric()
        self._shown: list[tuple[str, str]] = []

    # ---- vocabulary ------------------------------------------------------------------------------
    @property
    @override
    def tokenizer(self):
        if self._tokenizer is None:
            from lightning_tokens.models.tokenizers import resolve_tokenizer

            self._tokenizer = extend_tokenizer(resolve_tokenizer(self.tokenizer_name), self.speech_codebook_size)
        return self._tokenizer

    @property
    def speech_vocabulary(self) -> SpeechVocabulary:
        return SpeechVocabulary.from_tokenizer(self.tokenizer, self.speech_codebook_size)

    @override
    def prepare_language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Grow the embeddings and the head to the extended vocabulary; the text rows keep their values."""
        size = len(self.tokenizer)
        if model.get_input_embeddings().weight.shape[0] < size:
            model.resize_token_embeddings(size, mean_resizing=True)
        return model

    @override
    def lora_modules_to_save(self) -> list[str] | None:
        return ["embed_tokens", "lm_head"]  # the new speech rows must train beside the adapters

    # ---- acoustic side ---------------------------------------------------------------------------
    @property
    def codec(self) -> Any:
        """The frozen audio codec (loaded once; not part of the checkpoint)."""
        codec = self.__dict__.get("_codec")
        if codec is None and self.acoustic_settings is not None:
            from lightning_tokens.models.codecs import load_codec

            # kept out of the module tree: frozen, rebuilt from its name, never in a checkpoint
            codec = self.__dict__["_codec"] = load_codec(self.acoustic_settings.codec)
        if codec is not None and hasattr(codec, "to"):
            codec.to(self.device)
        return codec

    @property
    def acoustic_vocabulary(self) -> Any:
        from lightning_tokens.layers.prefix_lm import AcousticVocabulary

        return AcousticVocabulary(self.codec.codebook_size)

    @override
    def build_extra_modules(self) -> None:
        settings = self.acoustic_settings
        if settings is None or self.acoustic_decoder is not None:
            return
        from lightning_tokens.layers.prefix_lm import AcousticGPT

        vocab = self.acoustic_vocabulary
        self.acoustic_decoder = AcousticGPT(
            vocab_size=vocab.size, condition_dim=self.causal_lm.config.hidden_size, n_embd=settings.n_embd,
            n_layer=settings.n_layer, n_head=settings.n_head, block_size=settings.block_size,
            dropout=settings.dropout, speaker_dim=settings.speaker_dim, pad_id=vocab.pad,
        )

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        rate = getattr(datamodule, "sample_rate", None)
        if self.acoustic_settings is not None and rate is not None and rate != self.codec.sample_rate:
            raise ConfigError(
                f"data.sample_rate={rate} but the codec {self.acoustic_settings.codec!r} runs at "
                f"{self.codec.sample_rate} Hz: set the datamodule's sample_rate to {self.codec.sample_rate}."
            )

    # ---- batches ---------------------------------------------------------------------------------
    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "input_ids" not in batch and "text" in batch:
            batch = {**batch, **self.format_batch(batch)}
        return batch

    def format_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Token tensors of a :class:`SpeechDataModule` batch (see
        :func:`~lightning_tokens.modules.speech.formatting.collate_speech_examples`), plus ``is_generation``."""
        tokens = batch.get("speech_tokens")
        if tokens is None:
            raise DataError(
                "the batch has no speech_tokens: tokenize the data first (`lightning-tokens speech_tokens ...`) "
                "and train on the JSONL it writes."
            )
        tok, vocab = self.tokenizer, self.speech_vocabulary
        bos = bos_prefix(tok)
        examples = [
            format_speech_example(task, text, speech, tok, vocab, self.instructions, bos)
            for task, text, speech in zip(batch["task"], batch["text"], tokens)
        ]
        out = collate_speech_examples(examples, tok.pad_token_id, bos_length=len(bos))
        out["is_generation"] = torch.tensor([task in GENERATION_TASKS for task in batch["task"]])
        device = batch["audio"].device if "audio" in batch else self.device
        return {key: value.to(device) for key, value in out.items()}

    # ---- training --------------------------------------------------------------------------------
    @override
    def _loss(self, batch: dict[str, Any]) -> Tensor:
        loss, hidden = self.language_model_loss(batch)
        training = self._trainer is not None and self.trainer.training
        if self.acoustic_decoder is None:
            return loss
        acoustic = self.acoustic_loss(batch, hidden)
        if training:
            return loss + self.acoustic_settings.weight * acoustic
        if bool(batch["is_generation"].any()):
            (self.test_acoustic_loss if self.trainer.testing else self.val_acoustic_loss).update(acoustic)
        return loss

    def acoustic_condition(self, batch: dict[str, Any], hidden: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The LM hidden states the acoustic decoder is conditioned on, packed left: ``(R, C, D)`` and its
        key-padding mask ``(R, C)``, for the generation rows ``rows``. In training, Chain-of-Condition picks the
        question, the answer or both per example; otherwise both."""
        masks = []
        step = self.trainer.global_step if self._trainer is not None else 0
        for row in rows.tolist():
            choice = "both"
            if self.chain_of_condition and self.training:
                choice = condition_choice(self.condition_seed, step, str(batch["ids"][row]) if "ids" in batch else str(row), self.condition_probabilities)
            question, answer = batch["question_mask"][row], batch["answer_mask"][row]
            masks.append(question if choice == "question" else answer if choice == "answer" else question | answer)
        mask = torch.stack(masks)
        length = max(int(mask.sum(1).max()), 1)
        condition = hidden.new_zeros(len(masks), length, hidden.shape[-1])
        condition_mask = torch.zeros(len(masks), length, dtype=torch.bool, device=hidden.device)
        for i, (row, keep) in enumerate(zip(rows.tolist(), mask)):
            count = int(keep.sum())
            condition[i, :count] = hidden[row][keep]
            condition_mask[i, :count] = True
        return condition, condition_mask

    @torch.no_grad()
    def codec_tokens(self, audio: Tensor, lengths: Tensor) -> list[Tensor]:
        """The frozen codec's tokens of each waveform (served from the cache when seen before)."""
        waves = [audio[i, :n].detach().float().cpu().numpy() for i, n in enumerate(lengths.tolist())]

        def encode(items: list[Any]) -> list[Tensor]:
            lengths = torch.tensor([len(w) for w in items])
            padded = torch.zeros(len(items), int(lengths.max()))
            for i, wave in enumerate(items):
                padded[i, : len(wave)] = torch.from_numpy(wave)
            return self.codec.encode(padded.to(self.device), lengths.to(self.device))

        return [codes.to(self.device) for codes in self.codec_cache.map(waves, encode)]

    def acoustic_loss(self, batch: dict[str, Any], hidden: Tensor) -> Tensor:
        """The acoustic decoder's token loss on the codec tokens of the generation rows' audio (stream
        ``acoustic``). Every rank runs it, with a fully ignored dummy row when it has no generation rows, so that
        collective calls and DDP's gradient buckets stay in step."""
        rows = torch.nonzero(batch["is_generation"]).flatten()
        vocab = self.acoustic_vocabulary
        if len(rows):
            codes = self.codec_tokens(batch["audio"][rows], batch["audio_lengths"][rows])
            input_ids, labels = vocab.build_targets([c.to(hidden.device) for c in codes])
            condition, condition_mask = self.acoustic_condition(batch, hidden, rows)
        else:
            input_ids = torch.tensor([[vocab.start]], device=hidden.device)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            condition, condition_mask = hidden[:1, :1] * 0, torch.ones(1, 1, dtype=torch.bool, device=hidden.device)
        speaker = batch.get("speaker_embedding")
        if speaker is not None and len(rows):
            speaker = speaker[rows]
        out = self.acoustic_decoder(condition, condition_mask, input_ids.to(hidden.device), speaker=speaker if len(rows) else None)
        loss = self.token_loss(labels.to(hidden.device), hidden=out, head=self.acoustic_decoder.head, shift_labels=False, stream="acoustic")
        return loss + 0.0 * out.sum()  # keeps every parameter in the graph when no token is scored

    # ---- evaluation ------------------------------------------------------------------------------
    @override
    def _evaluate(self, batch: dict[str, Any], loss_metric: MeanMetric, metrics: Any, prefix: str) -> None:
        super()._evaluate(batch, loss_metric, None, prefix)  # the LM loss (and the acoustic loss's update)
        labels = batch["labels"]
        if self.acoustic_decoder is not None and bool(batch["is_generation"].any()):
            self.log(f"{prefix}/acoustic_loss", getattr(self, f"{prefix}_acoustic_loss"), batch_size=labels.shape[0])
        understanding = [i for i, task in enumerate(batch["task"]) if task in UNDERSTANDING_TASKS]
        if not (self.generate_in_validation and understanding):
            return
        answers = dict(zip(understanding, self.transcribe(batch, understanding)))
        asr = [i for i in understanding if batch["task"][i] == "asr"]
        if asr:  # transcripts: character and word error rates (lower-cased, punctuation stripped)
            room = max(0, SHOWN_TRANSCRIPTS - len(self._shown))
            self._shown += [(batch["text"][i], answers[i]) for i in asr[:room]]
            cer, wer = getattr(self, f"{prefix}_cer"), getattr(self, f"{prefix}_wer")
            predicted, truth = [answers[i] for i in asr], [batch["text"][i] for i in asr]
            cer.update(predicted, truth)
            wer.update(predicted, truth)
            self.log(f"{prefix}/cer", cer, prog_bar=True, batch_size=len(asr))
            self.log(f"{prefix}/wer", wer, batch_size=len(asr))
        sqa = [i for i in understanding if batch["task"][i] == "sqa"]
        if sqa:  # spoken questions: exact match of the normalised answer
            accuracy = getattr(self, f"{prefix}_sqa_accuracy")
            accuracy.update(torch.tensor([
                float(normalize_transcript(answers[i]) == normalize_transcript(batch["text"][i])) for i in sqa
            ], device=self.device))
            self.log(f"{prefix}/sqa_accuracy", accuracy, batch_size=len(sqa))

    @override
    def on_validation_epoch_start(self) -> None:
        self._shown = []

    @override
    def on_validation_epoch_end(self) -> None:
        if self._shown and not self.trainer.sanity_checking:
            lines = [f"  {truth!r:40} -> {predicted!r}" for truth, predicted in self._shown]
            rank_zero_info(f"step {self.global_step}: ASR on the validation set (reference -> transcript)\n" + "\n".join(lines))

    @torch.no_grad()
    def transcribe(self, batch: dict[str, Any], rows: list[int]) -> list[str]:
        """Greedy text answers of the understanding ``rows`` (speech in, text out)."""
        index = torch.tensor(rows, device=batch["prompt_input_ids"].device)
        sub = {key: batch[key][index] for key in ("prompt_input_ids", "prompt_attention_mask")}
        new = self.generate_ids(sub, max_new_tokens=self.generation_budget(), do_sample=False)
        new = torch.where(self.speech_vocabulary.is_speech(new), self.tokenizer.pad_token_id, new)
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @override
    def generation_budget(self, max_new_tokens: int | None = None) -> int:
        if max_new_tokens is not None:
            return max_new_tokens
        return self.max_new_tokens or 64

    # ---- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def speak(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        """Text → speech tokens (sampled by the LM, restricted to speech tokens until ``</audio>``) → codec
        tokens (sampled by the acoustic decoder, conditioned on the question and the generated answer) →
        waveforms. Returns per row ``speech_tokens``, ``acoustic_tokens`` and ``waveform``."""
        from transformers import LogitsProcessorList

        vocab, settings = self.speech_vocabulary, self.sampling
        index = torch.tensor(rows, device=batch["prompt_input_ids"].device)
        prompts, prompt_mask = batch["prompt_input_ids"][index], batch["prompt_attention_mask"][index]
        allowed = torch.zeros(len(self.tokenizer), dtype=torch.bool, device=prompts.device)
        allowed[vocab.offset : vocab.offset + vocab.codebook_size] = True
        allowed[vocab.close_id] = True
        opened = torch.cat([prompts, torch.full_like(prompts[:, :1], vocab.open_id)], 1)
        opened_mask = torch.cat([prompt_mask, torch.ones_like(prompt_mask[:, :1])], 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            generated = self.causal_lm.generate(
                input_ids=opened, attention_mask=opened_mask, do_sample=True, temperature=settings.temperature,
                top_p=settings.top_p, top_k=0, max_new_tokens=settings.max_speech_tokens,
                logits_processor=LogitsProcessorList([_AllowOnly(allowed)]), eos_token_id=vocab.close_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )[:, opened.shape[1] :]
        results = []
        for i, new in enumerate(generated):
            end = (new == vocab.close_id).nonzero()
            new = new[: int(end[0]) if len(end) else len(new)]
            results.append({"speech_tokens": (new - vocab.offset).tolist()})
        if self.acoustic_decoder is None:
            return results
        for i, result in enumerate(results):
            prompt = prompts[i][prompt_mask[i].bool()]
            answer = [vocab.open_id, *vocab.speech_ids(result["speech_tokens"]), vocab.close_id]
            ids = torch.cat([prompt, torch.tensor(answer, device=prompt.device)]).unsqueeze(0)
            hidden = self(ids, torch.ones_like(ids))
            bos = len(bos_prefix(self.tokenizer))
            condition = hidden[:, bos:]
            generator = torch.Generator(device=condition.device).manual_seed(settings.seed + i)
            codes = self.acoustic_decoder.generate(
                condition, torch.ones(condition.shape[:2], dtype=torch.bool, device=condition.device),
                max_new_tokens=settings.max_acoustic_tokens or self.acoustic_decoder.block_size, top_p=settings.acoustic_top_p,
                temperature=settings.acoustic_temperature, generator=generator,
            )[0]
            result["acoustic_tokens"] = codes.tolist()
            result["waveform"] = self.codec.decode([codes])[0].float().cpu() if len(codes) else torch.zeros(0)
        return results

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per example: ``task``, ``id``, ``reference`` (the text) and the output: ``prediction`` (understanding
        tasks) or ``speech_tokens`` and, with the acoustic decoder, the WAV file written (generation)."""
        outputs: dict[int, dict[str, Any]] = {}
        understanding = [i for i, task in enumerate(batch["task"]) if task in UNDERSTANDING_TASKS]
        if understanding:
            for i, text in zip(understanding, self.transcribe(batch, understanding)):
                outputs[i] = {"prediction": text}
        generation = [i for i, task in enumerate(batch["task"]) if task in GENERATION_TASKS]
        if generation:
            for i, result in zip(generation, self.speak(batch, generation)):
                waveform = result.pop("waveform", None)
                if waveform is not None:
                    result["audio_file"] = self._write_wav(str(batch["ids"][i]), waveform)
                outputs[i] = result
        return [
            {"id": str(batch["ids"][i]), "task": batch["task"][i], "reference": batch["text"][i], **outputs.get(i, {})}
            for i in range(len(batch["task"]))
        ]

    def _write_wav(self, name: str, waveform: Tensor) -> str:
        import soundfile

        folder = self.prediction_dir or os.path.join(self.trainer.default_root_dir if self._trainer else ".", "speech")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.wav")
        soundfile.write(path, waveform.clamp(-1, 1).numpy(), self.codec.sample_rate)
        return path

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.acoustic_decoder is not None:
            rank_zero_info(
                f"DualSpeechLM: {self.speech_codebook_size} speech tokens in a vocabulary of {len(self.tokenizer)}; "
                f"acoustic decoder over {self.codec.codebook_size} codec tokens at {self.codec.frame_rate:g} per second."
            )


class _AllowOnly:
    """A logits processor that keeps only the ``allowed`` vocabulary entries."""

    def __init__(self, allowed: Tensor) -> None:
        self.allowed = allowed

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores.masked_fill(~self.allowed[: scores.shape[-1]], float("-inf"))
