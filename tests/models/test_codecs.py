"""The frozen single-codebook codec wrappers (tiny random Encodec, Mimi, DAC)."""

from __future__ import annotations

import types

import pytest
import torch

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.models.codecs import AudioCodec, load_codec

EXPECTED = {  # name: (sample_rate, frame_rate, codebook_size)
    "tiny-encodec": (24000, 75.0, 1024),
    "tiny-mimi": (24000, 12.5, 2048),
    "tiny-dac": (16000, 31.25, 1024),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def codec(request) -> AudioCodec:
    return load_codec(request.param)


def _audio(codec: AudioCodec, seconds: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    samples = round(seconds * codec.sample_rate)
    t = torch.arange(samples) / codec.sample_rate
    tone = 0.3 * torch.sin(2 * torch.pi * (200 + 100 * seed) * t)
    return (tone + 0.05 * torch.randn(samples, generator=generator))[None]


def test_metadata(codec):
    name = f"tiny-{codec.kind}"
    assert (codec.sample_rate, codec.frame_rate, codec.codebook_size) == EXPECTED[name]
    assert codec.num_codebooks == 1
    assert codec.sample_rate == round(codec.frame_rate * codec.hop_length)


def test_one_second_gives_frame_rate_codes_in_codebook(codec):
    codes = codec.encode(_audio(codec, 1.0))
    assert len(codes) == 1 and codes[0].dtype == torch.long
    assert abs(len(codes[0]) - codec.frame_rate) <= 1
    assert len(codes[0]) == codec.num_frames(codec.sample_rate)
    assert int(codes[0].min()) >= 0 and int(codes[0].max()) < codec.codebook_size
    assert len(codes[0].unique()) > 1  # a random codec still tells frames apart


def test_decode_returns_about_the_input_length(codec):
    wav = _audio(codec, 1.0)
    audio = codec.decode(codec.encode(wav))
    assert len(audio) == 1 and audio[0].dim() == 1 and audio[0].is_floating_point()
    assert 0 <= audio[0].shape[0] - wav.shape[1] < codec.hop_length
    assert torch.isfinite(audio[0]).all()


def test_encode_is_deterministic_and_reproducible(codec):
    wav = _audio(codec, 0.5)
    first = codec.encode(wav)[0]
    assert torch.equal(first, codec.encode(wav)[0])
    assert torch.equal(first, load_codec(f"tiny-{codec.kind}").encode(wav)[0])  # seeded random weights


def test_batch_of_different_lengths_equals_each_alone(codec):
    long_wav, short_wav = _audio(codec, 1.0, seed=1)[0], _audio(codec, 0.43, seed=2)[0]
    shorter = _audio(codec, 0.43, seed=3)[0, :-5]  # same frame count as short_wav: encoded in one stack
    assert codec.num_frames(len(shorter)) == codec.num_frames(len(short_wav))
    batch = torch.full((3, long_wav.shape[0]), 0.7)  # garbage after the true lengths must not leak in
    batch[0], batch[1, : len(short_wav)], batch[2, : len(shorter)] = long_wav, short_wav, shorter
    together = codec.encode(batch, torch.tensor([len(long_wav), len(short_wav), len(shorter)]))
    alone = [codec.encode(wav[None])[0] for wav in (long_wav, short_wav, shorter)]
    assert len(together[1]) == codec.num_frames(short_wav.shape[0]) < len(together[0])
    for got, expected in zip(together, alone):
        assert torch.equal(got, expected)
    decoded = codec.decode(together)
    assert torch.allclose(decoded[1], codec.decode([alone[1]])[0], atol=1e-5)


def test_frozen(codec):
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not codec.model.training


def test_bad_inputs(codec):
    with pytest.raises(DataError, match="batch, samples"):
        codec.encode(torch.randn(1, 1, 100))
    with pytest.raises(DataError, match=r"lengths\[1\]"):
        codec.encode(torch.randn(2, 100), torch.tensor([100, 0]))
    with pytest.raises(DataError, match=r"codes\[0\].*outside the codebook"):
        codec.decode([torch.tensor([0, codec.codebook_size])])


def test_load_from_a_saved_folder(tmp_path):
    codec = load_codec("tiny-dac")
    codec.model.save_pretrained(tmp_path)
    reloaded = load_codec(str(tmp_path))
    assert reloaded.kind == "dac" and reloaded.frame_rate == codec.frame_rate
    wav = torch.randn(1, 8000)
    assert torch.equal(reloaded.encode(wav)[0], codec.encode(wav)[0])


def test_unsupported_model_type():
    fake = torch.nn.Linear(1, 1)
    fake.config = types.SimpleNamespace(model_type="wav2vec2")
    with pytest.raises(ConfigError, match="wav2vec2"):
        AudioCodec(fake)
