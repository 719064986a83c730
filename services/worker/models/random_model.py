"""Random-weight Hugging Face model folders for Llama, Qwen2 and Qwen3.

`write_random_model` writes config.json, generation_config.json and model.safetensors
(sharded with an index above ~4 GB), optionally with a copied tokenizer. The tiny shapes
are for CPU tests that compare our engine with transformers token for token; the real
shapes are for GPU benchmarks of real architectures.

Weight scales make greedy decoding decisive: with HF's init (std 0.02) logits are nearly
uniform and top-2 ties are common, so token-exact tests would test luck. Here linear weights
have std LINEAR_GAIN/sqrt(fan_in); embeddings and an untied lm_head std EMBED_GAIN/sqrt(hidden)
(small embeddings: a tied model with large ones just repeats its input token); RMSNorm
weights are 1 + N(0, NORM_NOISE), except the final norm, FINAL_NORM_SCALE times that, which
sets the logit std (~16); biases are N(0, BIAS_STD). With 4 tiny layers and fp32, the top-2
margins of greedy decoding stay >= ~1e-2 while fp32 kernel noise is ~1e-5..2e-4; norm
weights, biases and RoPE scaling each change the generated tokens if an engine skips them.

Every tensor has its own generator, seeded from (seed, name): a tensor's values don't
depend on sharding or on the other tensors, but do depend on `device` (CPU and CUDA
generators differ).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

EMBED_GAIN = 1.0
FINAL_NORM_SCALE = 16.0
LINEAR_GAIN = 1.5
NORM_NOISE = 0.1
BIAS_STD = 0.2
MAX_SHARD_BYTES = 4 * 10**9

_TINY = {"vocab_size": 512, "max_position_embeddings": 2048, "num_attention_heads": 4,
         "num_key_value_heads": 2}
_LLAMA3_TINY_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 256}

SHAPES: dict[str, dict[str, Any]] = {
    # Tiny test shapes: fp32, GQA (4 query heads, 2 KV heads), head_dim 32.
    "tiny-llama": {
        "architecture": "LlamaForCausalLM", **_TINY, "hidden_size": 128,
        "intermediate_size": 320, "num_hidden_layers": 4, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "rope_parameters": _LLAMA3_TINY_ROPE,
    },
    "tiny-llama-linear": {
        "architecture": "LlamaForCausalLM", **_TINY, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
    "tiny-qwen2": {
        "architecture": "Qwen2ForCausalLM", **_TINY, "hidden_size": 128,
        "intermediate_size": 384, "num_hidden_layers": 3, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 1000000.0},
    },
    "tiny-qwen3": {  # head_dim 32 != hidden/heads = 16
        "architecture": "Qwen3ForCausalLM", **_TINY, "hidden_size": 64, "head_dim": 32,
        "intermediate_size": 192, "num_hidden_layers": 4, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": 1000000.0},
    },
    # Small shapes with the head dims of real models (64, 128): the GPU kernels' tests.
    "small-qwen3": {
        "architecture": "Qwen3ForCausalLM", **_TINY, "hidden_size": 256, "head_dim": 64,
        "intermediate_size": 512, "num_hidden_layers": 3, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 1000000.0},
    },
    "small-llama": {
        "architecture": "LlamaForCausalLM", **_TINY, "num_attention_heads": 8,
        "hidden_size": 512, "head_dim": 128, "intermediate_size": 1024,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": _LLAMA3_TINY_ROPE,
    },
    # Real shapes: dimensions of the public configs (bos/eos come from a tokenizer, if given).
    "qwen3-0.6b": {
        "architecture": "Qwen3ForCausalLM", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "qwen3-8b": {
        "architecture": "Qwen3ForCausalLM", "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "qwen2.5-1.5b": {
        "architecture": "Qwen2ForCausalLM", "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "llama-3.2-1b": {
        "architecture": "LlamaForCausalLM", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    },
}

_DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"),
           "float16": (torch.float16, "F16")}
_TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                    "merges.txt", "chat_template*", "*.tiktoken", "spiece.model")


def make_config(shape: str, **overrides: Any) -> Any:
    """The transformers config of a named shape; `overrides` replace config kwargs."""
    import transformers

    spec = json.loads(json.dumps(SHAPES[shape]))  # deep copy: configs mutate rope dicts
    arch = spec.pop("architecture")
    spec.update(overrides)
    spec.setdefault("bos_token_id", None)
    spec.setdefault("eos_token_id", spec["vocab_size"] - 1)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**spec)
    config.architectures = [arch]
    return config


def _config_param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def param_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors written for `shape` (no tokenizer); allocates nothing."""
    return _config_param_shapes(make_config(shape))


def _init_spec(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal distribution that tensor `name` is drawn from."""
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return 0.0, EMBED_GAIN / math.sqrt(shape[1])
    if name == "model.norm.weight":
        return FINAL_NORM_SCALE, FINAL_NORM_SCALE * NORM_NOISE
    if name.endswith(".bias"):
        return 0.0, BIAS_STD
    if name.endswith("norm.weight") and len(shape) == 1:
        return 1.0, NORM_NOISE
    if name.endswith(".weight") and len(shape) == 2:
        return 0.0, LINEAR_GAIN / math.sqrt(shape[1])
    raise ValueError(f"no init rule for {name} {shape}")


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                   device: str) -> torch.Tensor:
    mean, std = _init_spec(name, shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(_tensor_seed(seed, name))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    t.mul_(std).add_(mean)
    return t.to(dtype).cpu().contiguous()


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                       seed: int, device: str) -> None:
    """Stream tensors into one safetensors file; peak memory is about one tensor."""
    torch_dtype, st_dtype = _DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            t = _random_tensor(name, shape, torch_dtype, seed, device)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t


def _plan_shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += nbytes
    return shards


def _tokenizer_info(tokenizer_dir: Path) -> tuple[int, int | None, Any, int | None]:
    """(vocabulary size incl. added tokens, bos id, eos id, pad id) of a tokenizer folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def write_random_model(out_dir: str | Path, shape: str, *, dtype: str = "float32",
                       seed: int = 0, tokenizer_dir: str | Path | None = None,
                       device: str = "cpu", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a random-weight HF model folder for `shape` into `out_dir`; return its path.

    With `tokenizer_dir`, its tokenizer files are copied, bos/eos/pad ids come from the
    tokenizer and vocab_size is raised to the tokenizer's size (tiny shapes take it exactly,
    so every id the model can emit decodes). Without, eos is vocab_size - 1 and bos is None.
    """
    from transformers import GenerationConfig

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        n_tok, bos, eos, pad = _tokenizer_info(tokenizer_dir)
        vocab = SHAPES[shape]["vocab_size"]
        vocab = n_tok if shape.startswith("tiny-") else max(vocab, n_tok)
        overrides = {"vocab_size": vocab, "bos_token_id": bos,
                     "eos_token_id": eos if eos is not None else vocab - 1, "pad_token_id": pad}
        for pattern in _TOKENIZER_GLOBS:
            for src in sorted(tokenizer_dir.glob(pattern)):
                if src.is_file():
                    shutil.copyfile(src, out / src.name)
    config = make_config(shape, **overrides)
    config.dtype = _DTYPES[dtype][0]

    entries = list(_config_param_shapes(config).items())
    itemsize = torch.empty((), dtype=_DTYPES[dtype][0]).element_size()
    shards = _plan_shards(entries, itemsize, max_shard_bytes)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model*.index.json")):
        old.unlink()
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], dtype, seed, device)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / fname, shard, dtype, seed, device)
            weight_map.update({name: fname for name, _ in shard})
        total = sum(math.prod(s) for _, s in entries) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config.save_pretrained(str(out))
    gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                           pad_token_id=config.pad_token_id, do_sample=False)
    gen.save_pretrained(str(out))
    return out


def tiny_test_model(shape: str, root: Path, tokenizer_dir: Path | None = None) -> Path:
    """A cached random model folder for `shape` (seed 0, fp32) under `root`.

    Folders are keyed by (shape, tokenizer_dir) and published with an atomic rename, so
    concurrent test processes may share `root`.
    """
    root = Path(root)
    name = shape
    if tokenizer_dir is not None:
        key = str(Path(tokenizer_dir).resolve())
        name += "-tok-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    final = root / name
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write_random_model(tmp, shape, tokenizer_dir=tokenizer_dir)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
