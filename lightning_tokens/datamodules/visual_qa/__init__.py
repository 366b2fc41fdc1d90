"""Visual question answering data: a user's ``{image, question, answer}`` files or a generated offline benchmark in
the spirit of GVTBench (object counting, multi-class identification, scikit-learn digits), batched by the
vision-language module's processor: :mod:`.records` (reading files), :mod:`.benchmark` (the generated tasks) and
:class:`VisualQADataModule` (:mod:`.datamodule`)."""

from lightning_tokens.datamodules.visual_qa.benchmark import (
    BENCHMARK_TASKS,
    COLORS,
    SHAPES,
    DigitImage,
    Shape,
    ShapeScene,
    generate_benchmark_split,
)
from lightning_tokens.datamodules.visual_qa.datamodule import (
    VisionTextProcessor,
    VisualQACollator,
    VisualQADataModule,
    VisualQADataset,
)
from lightning_tokens.datamodules.visual_qa.records import (
    FileImage,
    VisualQADataError,
    VisualQAExample,
    read_visual_qa_file,
)

__all__ = [
    "BENCHMARK_TASKS",
    "COLORS",
    "SHAPES",
    "DigitImage",
    "FileImage",
    "Shape",
    "ShapeScene",
    "VisionTextProcessor",
    "VisualQACollator",
    "VisualQADataError",
    "VisualQADataModule",
    "VisualQADataset",
    "VisualQAExample",
    "generate_benchmark_split",
    "read_visual_qa_file",
]
