"""Random-weight model folders: loadable by transformers, decisive greedy decoding."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from services.worker.models import random_model as rm
from services.worker.models.random_model import (
    SHAPES,
    param_shapes,
    tiny_test_model,
    write_random_model,
)

TINY = [s for s in SHAPES if s.startswith("tiny-")]
MIN_MARGIN = 1e-3  # fp32 rounding noise in the top-2 margin is ~1e-5 .. 2e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("random_models")


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except TypeError:  # older transformers
        loaded = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    if isinstance(loaded, tuple):  # output_loading_info=True
        return loaded[0].eval(), loaded[1]
    return loaded.eval()


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int = 64) -> tuple[list[int], list[float]]:
    """HF greedy decoding (full recompute each step, so no eos stop and no cache API);
    returns the new tokens and each step's top-2 logit margin."""
    ids = list(prompt)
    margins = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], margins


def _prompts(vocab: int, lengths=(5, 17, 50, 100)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _check_decisive(model) -> tuple[float, list[int]]:
    """Assert the margin property; return (min margin, distinct tokens per prompt)."""
    margins, distinct = [], []
    for prompt in _prompts(model.config.vocab_size):
        tokens, m = _greedy(model, prompt)
        margins += m
        distinct.append(len(set(tokens)))
    assert min(margins) > MIN_MARGIN, f"near-tie in greedy decoding: {min(margins):.3g}"
    assert min(distinct) > 1, f"degenerate generation, distinct tokens per prompt {distinct}"
    return min(margins), distinct


@pytest.mark.parametrize("shape", TINY)
def test_tiny_loads_with_transformers(shape, root):
    path = tiny_test_model(shape, root)
    model, info = _load(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    spec = SHAPES[shape]
    assert type(model).__name__ == spec["architecture"]
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.tie_word_embeddings == spec["tie_word_embeddings"]
    if spec["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = json.loads((path / "config.json").read_text())
    assert saved["dtype"] == "float32" and saved["eos_token_id"] == saved["vocab_size"] - 1
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(param_shapes(shape))
    logits = model(input_ids=torch.tensor([_prompts(512)[2]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shape", TINY)
def test_tiny_greedy_is_decisive_and_varied(shape, root):
    min_margin, distinct = _check_decisive(_load(tiny_test_model(shape, root)))
    print(f"{shape}: min top-2 margin {min_margin:.4g}, distinct tokens {distinct}")


def test_decisiveness_check_rejects_hf_default_init(root):
    """The check has teeth: HF's own init (std 0.02) gives near-uniform logits and fails it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(rm.make_config("tiny-llama")).float().eval()
    with pytest.raises(AssertionError):
        _check_decisive(model)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-llama-linear"])
def test_rope_scaling_changes_frequencies_and_tokens(shape, root):
    path = tiny_test_model(shape, root)
    model = _load(path)
    plain_cfg = rm.make_config(shape, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0})
    plain = _load(path, config=plain_cfg)
    scaled_f, plain_f = model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq
    changed = ~torch.isclose(scaled_f, plain_f)
    assert changed.any()
    if shape == "tiny-llama":  # llama3 keeps the high frequencies
        assert not changed.all()
    prompt = _prompts(512)[-1]
    assert _greedy(model, prompt)[0] != _greedy(plain, prompt)[0]


def test_same_seed_same_bytes(tmp_path):
    a = write_random_model(tmp_path / "a", "tiny-qwen3", seed=7)
    b = write_random_model(tmp_path / "b", "tiny-qwen3", seed=7)
    c = write_random_model(tmp_path / "c", "tiny-qwen3", seed=8)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_equals_unsharded(tmp_path, root):
    sharded = write_random_model(tmp_path / "s", "tiny-llama", max_shard_bytes=300_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    shapes = param_shapes("tiny-llama")
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == 4 * sum(math.prod(s) for s in shapes.values())
    prompt = torch.tensor([_prompts(512)[1]])
    whole = _load(tiny_test_model("tiny-llama", root))
    assert torch.equal(_load(sharded)(input_ids=prompt).logits, whole(input_ids=prompt).logits)


def test_bfloat16(tmp_path):
    path = write_random_model(tmp_path / "bf16", "tiny-qwen2", dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    logits = _load(path)(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        write_random_model(tmp_path / "x", "tiny-qwen2", dtype="int8")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(597)]  # 600 > 512
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>"}))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (d / "config.json").write_text("{}")  # not a tokenizer file: must not be copied
    return d


def test_tokenizer_is_copied_and_sets_vocab_and_ids(tokenizer_dir, root):
    # Not tiny-qwen2: transformers 5 AutoTokenizer forces Qwen2Tokenizer on model_type qwen2,
    # whatever tokenizer_config.json says, which can't run this word-level tokenizer.
    path = tiny_test_model("tiny-qwen3", root, tokenizer_dir=tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 600
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    out = _load(path).generate(**tok("w1 w2 w3", return_tensors="pt"), max_new_tokens=8,
                               do_sample=False)
    assert out.shape[1] > 3 and int(out.max()) < 600
    assert not (path / "config.json").read_text() == "{}"


def test_tiny_test_model_caches(tokenizer_dir, root):
    a = tiny_test_model("tiny-qwen3", root)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert tiny_test_model("tiny-qwen3", root) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    b = tiny_test_model("tiny-qwen3", root, tokenizer_dir=tokenizer_dir)
    assert b != a and (b / "tokenizer.json").exists() and not (a / "tokenizer.json").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers


# Parameter counts of the public checkpoints (total incl. embeddings, non-embedding).
REAL_COUNTS = {
    "qwen3-0.6b": (596_049_920, 440_467_456),
    "qwen3-8b": (8_190_735_360, 6_946_075_648),
    "qwen2.5-1.5b": (1_543_714_304, 1_310_340_608),
    "llama-3.2-1b": (1_235_814_400, 973_146_112),
}


@pytest.mark.parametrize("shape", sorted(REAL_COUNTS))
def test_real_shapes_without_allocating(shape):
    shapes = param_shapes(shape)
    spec = SHAPES[shape]
    total = sum(math.prod(s) for s in shapes.values())
    embedding = spec["vocab_size"] * spec["hidden_size"] * (1 if spec["tie_word_embeddings"] else 2)
    assert (total, total - embedding) == REAL_COUNTS[shape]
    assert ("lm_head.weight" in shapes) != spec["tie_word_embeddings"]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.")}
    assert layers == set(range(spec["num_hidden_layers"]))
    head_dim = spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    kv = spec["num_key_value_heads"] * head_dim
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, spec["hidden_size"])
    arch = spec["architecture"]
    assert ("model.layers.0.self_attn.q_norm.weight" in shapes) == (arch == "Qwen3ForCausalLM")
    assert ("model.layers.0.self_attn.q_proj.bias" in shapes) == (arch == "Qwen2ForCausalLM")


def test_qwen3_8b_shard_plan():
    entries = list(param_shapes("qwen3-8b").items())
    shards = rm._plan_shards(entries, 2, rm.MAX_SHARD_BYTES)
    sizes = [sum(math.prod(s) for _, s in shard) * 2 for shard in shards]
    assert len(shards) == 5 and max(sizes) <= rm.MAX_SHARD_BYTES
    assert [e for shard in shards for e in shard] == entries
