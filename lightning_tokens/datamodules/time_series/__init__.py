"""Time series as images for vision-language models (TimeMaster): the reference's plots, cached as PNG files."""

from lightning_tokens.datamodules.time_series.render import PlotCache, PlotSettings, StalePlotWarning, load_plot, render_series

__all__ = ["PlotCache", "PlotSettings", "StalePlotWarning", "load_plot", "render_series"]
