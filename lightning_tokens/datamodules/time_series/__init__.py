"""Time series classification for language and vision-language models (TimeMaster): shipped UCR/UEA sets and
your files, the reference's plots (cached as PNG files), its prompts, and a datamodule that batches them."""

from lightning_tokens.datamodules.time_series.archive import SHIPPED_TASKS, ArchiveTask, load_shipped, read_series_file
from lightning_tokens.datamodules.time_series.datamodule import (
    NumericPromptProcessor,
    TimeSeriesCollator,
    TimeSeriesDataModule,
    TimeSeriesExample,
)
from lightning_tokens.datamodules.time_series.render import PlotCache, PlotSettings, StalePlotWarning, load_plot, render_series

__all__ = [
    "SHIPPED_TASKS",
    "ArchiveTask",
    "NumericPromptProcessor",
    "PlotCache",
    "PlotSettings",
    "StalePlotWarning",
    "TimeSeriesCollator",
    "TimeSeriesDataModule",
    "TimeSeriesExample",
    "load_plot",
    "load_shipped",
    "read_series_file",
    "render_series",
]
