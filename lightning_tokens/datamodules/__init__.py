"""LightningDataModules, one per data source: ``sft/`` (your JSONL / JSON / CSV files), ``nupa/`` (Number
Cookbook tasks generated in code), ``filters/`` (record filters for data selection), ``sampling.py``
(resumable shuffling), ``visual_qa/`` (image question answering: your files, or a GVTBench-style benchmark
generated in code), ``time_series/`` (time series classification as TimeMaster prompts: plots or numbers),
``speech.py`` (spoken JSONL manifests; ``speech_synthesis.py`` makes one offline and is never imported here)."""

from lightning_tokens.datamodules.contrastive import ContrastiveCollator, ContrastiveDataModule, collate_contrastive
from lightning_tokens.datamodules.image_codes import ImageCodesDataModule, extract_codes
from lightning_tokens.datamodules.images import ImageDataModule, ImageFolderDataset
from lightning_tokens.datamodules.nupa import (
    NUPA_TASKS,
    NUPACollator,
    NUPADataModule,
    NUPADataset,
    NUPAExample,
    generate_nupa_examples,
    iter_nupa_examples,
)
from lightning_tokens.datamodules.filters import BranchingDensityFilter, InstructMiningFilter, RecordFilter
from lightning_tokens.datamodules.sft import (
    FALLBACK_CHAT_TEMPLATE,
    PackedSFTDataset,
    SFTCollator,
    SFTDataError,
    SFTDataModule,
    SFTDataset,
    pack_examples,
    packed_attention_mask,
    stable_example_id,
)
from lightning_tokens.datamodules.time_series import TimeSeriesDataModule
from lightning_tokens.datamodules.visual_qa import (
    BENCHMARK_TASKS,
    VisionTextProcessor,
    VisualQACollator,
    VisualQADataError,
    VisualQADataModule,
    VisualQADataset,
    VisualQAExample,
    generate_benchmark_split,
    read_visual_qa_file,
)
from lightning_tokens.datamodules.speech import (
    SPEECH_TASKS,
    LengthBucketBatchSampler,
    SpeechDataModule,
    SpeechDataset,
    collate_speech,
    load_audio,
    read_speech_manifest,
)

__all__ = [
    "SPEECH_TASKS",
    "LengthBucketBatchSampler",
    "SpeechDataModule",
    "SpeechDataset",
    "collate_speech",
    "load_audio",
    "read_speech_manifest",
    "ContrastiveCollator",
    "ContrastiveDataModule",
    "collate_contrastive",
    "BENCHMARK_TASKS",
    "VisionTextProcessor",
    "VisualQACollator",
    "VisualQADataError",
    "TimeSeriesDataModule",
    "VisualQADataModule",
    "VisualQADataset",
    "VisualQAExample",
    "generate_benchmark_split",
    "read_visual_qa_file",
    "BranchingDensityFilter",
    "FALLBACK_CHAT_TEMPLATE",
    "ImageCodesDataModule",
    "ImageDataModule",
    "ImageFolderDataset",
    "InstructMiningFilter",
    "RecordFilter",
    "NUPA_TASKS",
    "NUPACollator",
    "NUPADataModule",
    "NUPADataset",
    "NUPAExample",
    "PackedSFTDataset",
    "SFTCollator",
    "SFTDataError",
    "SFTDataModule",
    "SFTDataset",
    "extract_codes",
    "generate_nupa_examples",
    "iter_nupa_examples",
    "pack_examples",
    "packed_attention_mask",
    "stable_example_id",
]
