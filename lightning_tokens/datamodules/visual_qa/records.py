"""Visual QA records: the :class:`VisualQAExample` every source produces, and reading a user's JSON Lines, JSON or
CSV file of ``{image, question, answer}`` records into examples, with errors that name the file, the line and the
field.

Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> Image.new("RGB", (8, 8), "red").save(os.path.join(folder, "red.png"))
    >>> with open(os.path.join(folder, "data.csv"), "w") as f:
    ...     _ = f.write("image,question,answer\\nred.png,What colour is it?,red\\n")
    >>> [example] = read_visual_qa_file(os.path.join(folder, "data.csv"))
    >>> example.answer, example.image.render().getpixel((0, 0))
    ('red', (255, 0, 0))
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.datamodules.text_files import read_utf8_text

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "FileImage",
    "ImageSource",
    "VisualQADataError",
    "VisualQAExample",
    "load_image",
    "read_visual_qa_file",
]

FileFormat = Literal["auto", "jsonl", "json", "csv"]
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


class VisualQADataError(DataError):
    """A problem in a visual QA data file or one of its images; the message names the file, the line and the
    field."""


class ImageSource(Protocol):
    """Anything that draws or loads one image: ``render()`` returns a PIL RGB image."""

    def render(self) -> Image.Image: ...


def load_image(path: str, location: str = "") -> Image.Image:
    """The image at ``path`` as PIL RGB (fully decoded).

    Args:
        path: image file.
        location: where the path was given (``"data.jsonl, line 3, field 'image'"``), named in errors.

    Raises:
        VisualQADataError: the file is missing or Pillow cannot decode it.
    """
    from PIL import Image

    where = f"{location}: " if location else ""
    if not os.path.isfile(path):
        raise VisualQADataError(
            f"{where}image file {path!r} does not exist (relative paths are relative to the data file's folder); "
            "fix the path or add the file."
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise VisualQADataError(f"{where}cannot read image {path!r} ({err}); replace it with a PNG/JPEG file.") from None


def _check_image(path: str, location: str) -> None:
    """Cheap readability check at setup: the file exists and Pillow recognises and verifies it."""
    from PIL import Image

    if not os.path.isfile(path):
        load_image(path, location)  # raises the missing-file error
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise VisualQADataError(
            f"{location}: cannot read image {path!r} ({err}); replace it with a PNG/JPEG file."
        ) from None


@dataclass(frozen=True)
class FileImage:
    """An image file named by a record of a user's data file.

    Attributes:
        path: the resolved path.
        location: where the record named it (``"data.jsonl, line 3, field 'image'"``), named in errors.
    """

    path: str
    location: str = field(default="", compare=False)

    def render(self) -> Image.Image:
        """The file's image as PIL RGB.

        Raises:
            VisualQADataError: the file is missing or is not an image Pillow can read.
        """
        return load_image(self.path, self.location)


@dataclass(frozen=True)
class VisualQAExample:
    """One question about one image.

    Attributes:
        image: the image source; ``image.render()`` gives a PIL RGB image (a :class:`FileImage`, or a
            generated :class:`~lightning_tokens.datamodules.visual_qa.benchmark.ShapeScene` /
            :class:`~lightning_tokens.datamodules.visual_qa.benchmark.DigitImage`).
        question: the question text (before the datamodule's ``prompt_format``).
        answer: the expected answer, ``None`` for prediction-only records.
        domain: the task name (``"counting"``, ``"mci"``, ``"digits"``, or a user file's domain); metrics are
            routed by it.
        count: ground-truth count of a counting example, else ``None``.
        num_objects: how many objects the image holds, when known (generated shape images), else ``None``.
        location: where the example comes from, for messages (``"data.csv, line 4"``,
            ``"benchmark counting/train #12"``).
    """

    image: Any
    question: str
    answer: str | None
    domain: str
    count: int | None = None
    num_objects: int | None = None
    location: str = field(default="", compare=False)


# -- reading files ----------------------------------------------------------------------------------------
def _read_text(path: str, option: str) -> str:
    return read_utf8_text(
        path,
        f"{option} {path!r} does not exist; fix the path in {option}.",
        lambda line, column, byte, reason: VisualQADataError(
            f"{path}, line {line}: not UTF-8 text ({reason}); save the file as UTF-8."
        ),
    )


def _json_records(path: str, text: str) -> list[tuple[str, Any]]:
    """``(location, value)`` per record of a JSON Lines file or a JSON array."""
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise VisualQADataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}, column {err.colno}).") from None
        return [(f"{path}, index {i}", value) for i, value in enumerate(values)]
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise VisualQADataError(f"{path}, line {lineno}: invalid JSON ({err.msg}, column {err.colno}).") from None
        records.append((f"{path}, line {lineno}", value))
    return records


def _csv_records(path: str, text: str) -> list[tuple[str, Any]]:
    """``(location, row)`` per CSV row; an empty cell is an empty string, a short row lacks its last fields."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            raise VisualQADataError(f"{path}, line 1: a CSV file needs a header row naming its fields (image,question,answer).")
    except csv.Error as err:
        raise VisualQADataError(f"{path}, line 1: unreadable CSV ({err}).") from None
    records = []
    line_end = reader.line_num
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as err:
            raise VisualQADataError(f"{path}, line {line_end + 1}: unreadable CSV ({err}).") from None
        start, line_end = line_end + 1, reader.line_num
        records.append((f"{path}, line {start}", {k: v for k, v in row.items() if k is not None and v is not None}))
    return records


def _text_field(
    location: str, record: dict[str, Any], name: str, option: str, *, required: bool, what: str
) -> str | None:
    if name not in record or record[name] is None:
        if not required:
            return None
        raise VisualQADataError(
            f"{location}, field '{name}': missing; every record needs its {what} "
            f"(or set {option} to the field that holds it)."
        )
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise VisualQADataError(f"{location}, field '{name}': expected text, got {type(value).__name__} {value!r}.")
    text = str(value)
    if not text.strip():
        if not required:  # an empty optional cell (a CSV column left blank) is an absent field
            return None
        raise VisualQADataError(f"{location}, field '{name}': empty {what}; write the {what} or drop the record.")
    return text


def read_visual_qa_file(
    path: str,
    *,
    image_field: str = "image",
    question_field: str = "question",
    answer_field: str = "answer",
    domain_field: str = "domain",
    default_domain: str = "vqa",
    require_answer: bool = True,
    check_images: bool = True,
    file_format: FileFormat = "auto",
    option: str = "data file",
) -> list[VisualQAExample]:
    """The examples of a JSON Lines / JSON array / CSV file of ``{image, question, answer}`` records.

    Args:
        path: the data file.
        image_field: field holding the image path, relative to the data file's folder (or absolute).
        question_field: field holding the question.
        answer_field: field holding the answer (numbers are read as their text).
        domain_field: optional field naming the record's task; metrics are routed by it (``"counting"``,
            ``"mci"`` and ``"digits"`` get the GVTBench scores, any other domain an exact match).
        default_domain: domain of records without ``domain_field``.
        require_answer: ``False`` for prediction files, whose records may omit the answer.
        check_images: check at read time that every image exists and Pillow can open and verify it (a header and
            checksum read, not a full decode).
        file_format: ``"auto"`` (from the extension: ``.jsonl``/``.ndjson``, ``.json``, ``.csv``), or the format.
        option: the option that named the file (``"train_file"``), for messages.

    Returns:
        One :class:`VisualQAExample` per record, in file order; a ``"counting"`` record with an integer answer
        also gets ``count``.

    Raises:
        MissingFileError: ``path`` does not exist.
        VisualQADataError: a record is not an object, lacks a field, has an empty field, or names an image that is
            missing or unreadable; the message names the file, the line (``index`` for a JSON array) and the field.
        ConfigError: the format cannot be told from the extension.
    """
    fmt = file_format
    if fmt == "auto":
        ext = os.path.splitext(path)[1].lower()
        if ext not in _EXTENSIONS:
            raise ConfigError(
                f"{option} {path!r}: cannot tell the format from the extension {ext!r}; use .jsonl, .json or .csv."
            )
        fmt = _EXTENSIONS[ext]  # type: ignore[assignment]
    elif fmt not in ("jsonl", "json", "csv"):
        raise ConfigError(f"file_format={fmt!r} must be one of 'auto', 'jsonl', 'json', 'csv'.")
    text = _read_text(path, option)
    raw = _csv_records(path, text) if fmt == "csv" else _json_records(path, text)
    folder = os.path.dirname(os.path.abspath(path))
    checked: set[str] = set()
    examples = []
    for location, record in raw:
        if not isinstance(record, dict):
            raise VisualQADataError(
                f"{location}: expected an object with fields {image_field!r}, {question_field!r}, {answer_field!r}; "
                f"got {type(record).__name__}."
            )
        image = _text_field(location, record, image_field, "image_field", required=True, what="image path")
        question = _text_field(location, record, question_field, "question_field", required=True, what="question")
        answer = _text_field(location, record, answer_field, "answer_field", required=require_answer, what="answer")
        domain = _text_field(location, record, domain_field, "domain_field", required=False, what="domain")
        assert image is not None and question is not None
        image_path = os.path.join(folder, os.path.expanduser(image))
        image_location = f"{location}, field '{image_field}'"
        if check_images and image_path not in checked:
            _check_image(image_path, image_location)
            checked.add(image_path)
        domain = domain.strip() if domain is not None else default_domain
        count = None
        if domain == "counting" and answer is not None and re.fullmatch(r"\s*\d+\s*", answer):
            count = int(answer)
        examples.append(
            VisualQAExample(
                image=FileImage(image_path, image_location),
                question=question,
                answer=answer,
                domain=domain,
                count=count,
                location=location,
            )
        )
    if not examples:
        raise VisualQADataError(f"{path}: {option} holds no records; add {{image, question, answer}} records.")
    return examples
