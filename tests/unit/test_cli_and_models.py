"""The `nanopd generate` command, the embedded default model through our engine, model errors."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from services.cli import main
from services.worker.models.config import ModelConfig, UnsupportedModelError
from services.worker.models.layers import rope_inv_freq


def test_generate_json_one_object_per_prompt_in_order(tiny_model):
    path = tiny_model("tiny-qwen3")
    args = ["generate", "--model", str(path), "--raw", "--json", "--max-tokens", "5",
            "--ignore-eos", "first prompt", "second, longer prompt here"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["prompt"] for r in records] == ["first prompt", "second, longer prompt here"]
    assert all(len(r["token_ids"]) == 5 and isinstance(r["text"], str) for r in records)


def test_generate_rejects_bad_parameters_with_their_name(tiny_model):
    path = tiny_model("tiny-qwen3")
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--top-p", "2", "hi"])
    assert result.exit_code != 0 and "top_p" in result.output and "(0, 1]" in result.output
    result = CliRunner().invoke(main, ["generate", "--model", "/no/such/folder", "hi"])
    assert result.exit_code != 0 and "does not exist" in result.output


@pytest.mark.slow
def test_default_model_answers_paris_through_our_engine():
    result = CliRunner().invoke(main, ["generate", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_unsupported_architecture_is_a_clear_error(tiny_model, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(tiny_model("tiny-llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelConfig.from_path(folder)


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_old_style_config_keys_parse():
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4 and cfg.torch_dtype == "bfloat16"
