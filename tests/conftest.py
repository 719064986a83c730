"""Shared fixtures: tiny random-weight models (with the embedded model's tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_SHAPES = ["tiny-llama", "tiny-llama-linear", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from services.worker.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_root: Path, tokenizer_dir: Path):
    """`tiny_model(shape)`: path of a cached random-weight HF folder of that shape."""
    from services.worker.models.random_model import tiny_test_model

    def make(shape: str) -> Path:
        return tiny_test_model(shape, model_root, tokenizer_dir)

    return make
