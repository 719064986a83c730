"""Which model the gateway serves: the folder of its tokenizer, its name, its vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import MeshConfig


def model_dir_of(cfg: MeshConfig) -> Path:
    """The folder whose tokenizer the gateway uses (the null model borrows the default's)."""
    if cfg.model and cfg.model != "null":
        return Path(cfg.model).expanduser()
    from services.worker.models.default_model import default_model_path

    return default_model_path()


def model_name_of(cfg: MeshConfig, model_dir: Path) -> str:
    if cfg.model:
        return model_dir.resolve().name
    from services.worker.models.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def model_vocab_size(model_dir: Path) -> int | None:
    try:
        size = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None
    return size if isinstance(size, int) else None
