"""Labelled time series from the UCR/UEA archive sets that aeon's wheel ships, and from the user's CSV, NPY/NPZ
and ``.ts`` files, as ``(series, labels)``: a list of ``(channels, length)`` float64 arrays (lengths may differ)
and their raw class labels.

Shipped sets (aeon 1.6 wheel, no download; splits as the archive defines them): :data:`SHIPPED_TASKS`. The
TimeMaster paper's CTU task is the UCR "Computers" set, which no wheel ships: load it from its ``.ts`` files.

aeon rather than sktime: both wheels ship the same sets, but aeon also has the classical baselines TimeMaster
is compared with (1-NN DTW, ROCKET); its numba dependency (~200 MB with llvmlite) is the price, so it is the
``time-series`` extra, imported only when a shipped set, a ``.ts`` file or a baseline is used.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError

__all__ = ["SHIPPED_TASKS", "ArchiveTask", "apply_nan_policy", "load_shipped", "read_series_file"]

Series = list[np.ndarray]


@dataclass(frozen=True)
class ArchiveTask:
    """What the prompt says about a shipped set: its domain, class words (raw label → word) and what each
    class means.

    Attributes:
        description: the task/domain text (TimeMaster style: what the signal is and how it was recorded).
        classes: raw archive label → the word the prompt and the answers use.
        class_descriptions: word → one line about the class.
        channel_names: names of a multivariate set's channels (legend and numeric prompt).
        mapping_note: how the raw labels were mapped, where the archive does not state it.
    """

    description: str
    classes: dict[str, str]
    class_descriptions: dict[str, str] = field(default_factory=dict)
    channel_names: tuple[str, ...] | None = None
    mapping_note: str = ""


_LISTED_ORDER = "raw labels mapped to the classes in the order the archive's description lists them"

#: The UCR/UEA sets aeon's wheel ships, with the words their prompts use. Class meanings follow the archive's
#: own descriptions (the comment header of each ``.ts`` file).
SHIPPED_TASKS: dict[str, ArchiveTask] = {
    "GunPoint": ArchiveTask(
        description=(
            "You are analyzing a time series signal that tracks the X-axis position of an actor's right hand, "
            "recorded at 30 frames per second for 5 seconds (150 points), while the actor makes one of two motions."
        ),
        classes={"1": "Gun", "2": "Point"},
        class_descriptions={
            "Gun": "The actor draws a replica gun from a hip holster, points it at a target, and returns it.",
            "Point": "The actor points at the target with the index finger, without a gun, and lowers the hand.",
        },
    ),
    "ItalyPowerDemand": ArchiveTask(
        description=(
            "You are analyzing a time series of the hourly electrical power demand in Italy over one day "
            "(24 values)."
        ),
        classes={"1": "Winter", "2": "Summer"},
        class_descriptions={
            "Winter": "A day from October to March (inclusive).",
            "Summer": "A day from April to September.",
        },
    ),
    "ArrowHead": ArchiveTask(
        description=(
            "You are analyzing a time series derived from the outline of an arrowhead (projectile point) image, "
            "converted with an angle-based method (251 points)."
        ),
        classes={"0": "Avonlea", "1": "Clovis", "2": "Mix"},
        class_descriptions={
            "Avonlea": "An Avonlea-type projectile point.",
            "Clovis": "A Clovis-type projectile point.",
            "Mix": "A projectile point of mixed type.",
        },
        mapping_note=_LISTED_ORDER,
    ),
    "BasicMotions": ArchiveTask(
        description=(
            "You are analyzing a six-channel time series from a smart watch (3D accelerometer and 3D gyroscope), "
            "sampled every tenth of a second for ten seconds (100 points), while a student performs an activity."
        ),
        classes={"standing": "Standing", "running": "Running", "walking": "Walking", "badminton": "Badminton"},
        class_descriptions={
            "Standing": "The student stands still.",
            "Running": "The student runs.",
            "Walking": "The student walks.",
            "Badminton": "The student plays badminton.",
        },
        channel_names=("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"),
    ),
    "OSULeaf": ArchiveTask(
        description=(
            "You are analyzing a time series of a leaf's outline, obtained by segmenting a digitized leaf image and "
            "tracing its boundary anti-clockwise (427 points)."
        ),
        classes={
            "1": "Acer Circinatum", "2": "Acer Glabrum", "3": "Acer Macrophyllum", "4": "Acer Negundo",
            "5": "Quercus Garryana", "6": "Quercus Kelloggii",
        },
        mapping_note=_LISTED_ORDER,
    ),
    "JapaneseVowels": ArchiveTask(
        description=(
            "You are analyzing a twelve-channel time series of linear prediction coefficients (7 to 29 frames) of "
            "a Japanese male speaker saying the vowels 'a' and 'e'. Identify the speaker."
        ),
        classes={str(i): f"Speaker{i}" for i in range(1, 10)},
        channel_names=tuple(f"lpc_{i}" for i in range(1, 13)),
    ),
    "ACSF1": ArchiveTask(
        description=(
            "You are analyzing a time series of an appliance's power consumption (1460 points), with long idle "
            "periods and bursts of energy use when the appliance is active."
        ),
        classes={
            "0": "Mobile phone", "1": "Coffee machine", "2": "Computer station", "3": "Fridge", "4": "Hi-Fi system",
            "5": "Lamp", "6": "Laptop", "7": "Microwave", "8": "Printer", "9": "Television",
        },
        mapping_note=_LISTED_ORDER,
    ),
}


def _aeon_datasets():  # noqa: ANN202 - a module
    try:
        import aeon.datasets as datasets
    except ImportError:
        raise ConfigError(
            "the shipped UCR/UEA sets and .ts files are read with aeon: pip install 'lightning-tokens[time-series]' "
            "(or pip install aeon)."
        ) from None
    return datasets


def _as_channels(values: object, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise DataError(f"{where}: a series must be (length,) or (channels, length) with length >= 1, got shape {array.shape}.")
    return np.ascontiguousarray(array)


def _series_list(X: object, where: str) -> Series:
    """aeon's ``X`` (a 3D array, or a list of 2D arrays for unequal lengths) → a list of ``(C, T)`` arrays."""
    return [_as_channels(x, f"{where}, series {i}") for i, x in enumerate(X)]  # type: ignore[arg-type]


def load_shipped(name: str, split: str) -> tuple[Series, list[str]]:
    """One split (``"train"`` or ``"test"``) of a shipped set, from aeon's wheel (never downloaded).

    Example:
        >>> series, labels = load_shipped("GunPoint", "train")
        >>> len(series), series[0].shape, sorted(set(labels))
        (50, (1, 150), ['1', '2'])
    """
    if name not in SHIPPED_TASKS:
        raise ConfigError(
            f"dataset={name!r} is not one of the shipped sets ({', '.join(SHIPPED_TASKS)}); the paper's CTU "
            "('Computers') is not shipped: give its .ts/.csv files as train_file / test_file."
        )
    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r}: the archive defines 'train' and 'test'.")
    datasets = _aeon_datasets()
    # no extract_path: with it aeon looks elsewhere and downloads
    X, y = datasets.load_classification(name, split=split)
    return _series_list(X, f"{name} {split}"), [str(label) for label in y]


def read_series_file(path: str, label_column: str = "label", id_column: str | None = None) -> tuple[Series, list[str]]:
    """Series and raw labels from one file, by its extension:

    - ``.ts``: the UCR/UEA text format (aeon's reader): univariate or multivariate, equal or unequal lengths.
    - ``.csv``: a header row; one series per row, its values in the columns other than ``label_column`` (in
      order). Multivariate: name an ``id_column``; the rows that share an id are one series' channels (in file
      order) and must share its label. Every row of a file has the same number of values: a ragged row (an
      empty cell) is an error naming its line; write ``nan`` for a missing value (see ``nan_policy``).
    - ``.npz``: arrays ``X`` (``(N, T)`` or ``(N, C, T)``) and ``y`` (``(N,)``).
    - ``.npy``: ``X`` as above; the labels in ``<same name>.labels.txt`` beside it, one per line.

    Raises:
        MissingFileError: the file (or the labels file of a ``.npy``) does not exist.
        DataError: what is wrong, with the file, line or index.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"time series file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".ts":
        try:
            X, y = _aeon_datasets().load_from_ts_file(path)
        except Exception as error:  # noqa: BLE001 - aeon raises IOError/ValueError/... with its own message
            raise DataError(f"{path}: not a readable .ts file ({type(error).__name__}: {error}).") from None
        return _series_list(X, path), [str(label) for label in y]
    if ext == ".csv":
        return _read_csv(path, label_column, id_column)
    if ext in (".npz", ".npy"):
        return _read_numpy(path)
    raise ConfigError(f"{path}: unsupported extension {ext!r}; use .ts, .csv, .npz or .npy.")


def _read_csv(path: str, label_column: str, id_column: str | None) -> tuple[Series, list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{path}: the file is empty; it needs a header row and one row per series.")
    header = [name.strip() for name in rows[0]]
    for name, option in ((label_column, "label_column"), (id_column, "id_column")):
        if name is not None and name not in header:
            raise DataError(f"{path}: no column {name!r} ({option}) in the header {header}.")
    label_at = header.index(label_column)
    id_at = header.index(id_column) if id_column is not None else None
    value_at = [i for i in range(len(header)) if i not in (label_at, id_at)]
    if not value_at:
        raise DataError(f"{path}: the header has no value columns besides {label_column!r}.")
    grouped: dict[str, tuple[list[np.ndarray], str, int]] = {}
    order: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise DataError(f"{path}, line {line}: {len(row)} cells for a header of {len(header)} columns.")
        row = row + [""] * (len(header) - len(row))
        label = row[label_at].strip()
        if not label:
            raise DataError(f"{path}, line {line}: the label ({label_column!r}) is empty.")
        values = []
        for i in value_at:
            cell = row[i].strip()
            if not cell:
                raise DataError(
                    f"{path}, line {line}: column {header[i]!r} is empty (a ragged row); every row needs a value "
                    "in every value column: write nan for a missing value, or use a .ts file for unequal lengths."
                )
            try:
                values.append(float(cell))
            except ValueError:
                raise DataError(f"{path}, line {line}: column {header[i]!r} holds {cell!r}, not a number.") from None
        key = row[id_at].strip() if id_at is not None else str(line)
        if key in grouped:
            channels, first_label, first_line = grouped[key]
            if label != first_label:
                raise DataError(
                    f"{path}, line {line}: series {key!r} has label {label!r} here but {first_label!r} on line {first_line}."
                )
            channels.append(np.asarray(values))
        else:
            grouped[key] = ([np.asarray(values)], label, line)
            order.append(key)
    if not order:
        raise DataError(f"{path}: no data rows after the header.")
    series = [np.ascontiguousarray(np.stack(grouped[key][0])) for key in order]
    return series, [grouped[key][1] for key in order]


def _read_numpy(path: str) -> tuple[Series, list[str]]:
    labels_path = path[: -len(".npy")] + ".labels.txt"
    if path.lower().endswith(".npy") and not os.path.isfile(labels_path):
        raise MissingFileError(f"{path}: its labels file {labels_path!r} does not exist (one label per line).")
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                missing = [k for k in ("X", "y") if k not in archive.files]
                if missing:
                    raise DataError(f"{path}: the .npz needs arrays X and y; it has {archive.files}.")
                X, y = archive["X"], archive["y"]
        else:
            X = np.load(path, allow_pickle=False)
            with open(labels_path, encoding="utf-8") as handle:
                y = np.asarray([line.strip() for line in handle if line.strip()])
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: not a readable NumPy file ({error}).") from None
    if X.ndim not in (2, 3):
        raise DataError(f"{path}: X must be (N, T) or (N, C, T), got shape {X.shape}.")
    if len(y) != len(X):
        raise DataError(f"{path}: {len(X)} series but {len(y)} labels.")
    return _series_list(X, path), [str(label) for label in y.tolist()]


def apply_nan_policy(series: Sequence[np.ndarray], policy: str, where: str) -> Series:
    """``"error"``: any NaN/inf is a :class:`DataError` naming the series and position; ``"interpolate"``: NaNs
    are filled linearly from their neighbours in the same channel (ends: the nearest value); inf and an all-NaN
    channel are errors either way.

    Example:
        >>> apply_nan_policy([np.array([[1.0, np.nan, 3.0, np.nan]])], "interpolate", "x")[0].tolist()
        [[1.0, 2.0, 3.0, 3.0]]
    """
    if policy not in ("error", "interpolate"):
        raise ConfigError(f"nan_policy={policy!r}: use 'error' or 'interpolate'.")
    out = []
    for i, values in enumerate(series):
        bad = ~np.isfinite(values)
        if not bad.any():
            out.append(values)
            continue
        channel, position = (int(v) for v in np.argwhere(bad)[0])
        value = values[channel, position]
        if policy == "error" or math.isinf(value) or np.isinf(values).any():
            raise DataError(
                f"{where}, series {i}: {value} at channel {channel}, position {position}; clean the data, or set "
                "nan_policy: interpolate to fill NaNs linearly (inf is never filled)."
            )
        filled = values.copy()
        for c in range(filled.shape[0]):
            nan = np.isnan(filled[c])
            if nan.all():
                raise DataError(f"{where}, series {i}: channel {c} is all NaN; nothing to interpolate from.")
            if nan.any():
                idx = np.arange(filled.shape[1])
                filled[c, nan] = np.interp(idx[nan], idx[~nan], filled[c, ~nan])
        out.append(filled)
    return out
