"""Writing a tiny model as an ordinary Hugging Face folder: seeded weights, safetensors, processor files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.utils import logging as hf_logging


def seeded_model(model_cls: type[PreTrainedModel], config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    """Build `model_cls(config)` from `seed` without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


class _DropDefaultConfigTokenWarning(logging.Filter):
    """Drop the warning transformers 5 raises about its *own* default SiglipTextConfig while saving.

    `to_diff_dict` instantiates `SiglipTextConfig()`, whose defaults (vocab 32000, bos/eos 49406/49407) fail its own
    token-id check; the saved tiny config is valid, so the message would only mislead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "(between 0 and 31999), got 4940" not in record.getMessage()


def save_folder(out_dir: str | os.PathLike[str], model: PreTrainedModel, processor: ProcessorMixin) -> Path:
    """Write weights (safetensors), tokenizer and processor configs, plus a standalone preprocessor_config.json.

    transformers 5 nests the image processor inside processor_config.json; the separate preprocessor_config.json
    keeps `AutoImageProcessor` and older readers working on the same folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_logger = logging.getLogger("transformers.configuration_utils")
    quiet = _DropDefaultConfigTokenWarning()
    config_logger.addFilter(quiet)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for a 200 kB file is noise in test logs
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        config_logger.removeFilter(quiet)
        if bars_were_on:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    return out


