"""Build a model from an HF folder: config.json plus one or many *.safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.models.config import ModelConfig
from services.worker.models.layers import RotaryEmbedding
from services.worker.models.llama import CausalLM

# checkpoint projection name -> (our fused parameter, shard index)
FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def _shard_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


def load_model(
    model_dir: str | Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[CausalLM, ModelConfig]:
    """Our model with the checkpoint's weights, in `dtype` on `device`, in eval mode."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_path(model_dir)
    with torch.device("meta"):  # no time spent on random init
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE tables are computed here (not loaded) and stay fp32, as HF computes them.
    rotary = RotaryEmbedding(
        cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
    ).to(device)
    for attn in model.attention_layers():
        attn.rotary = rotary
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                tensor = f.get_tensor(name)
                target, shard = name, None
                for ckpt, (fused, idx) in FUSED.items():
                    if f".{ckpt}." in name:
                        target, shard = name.replace(ckpt, fused), idx
                        break
                if target == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
                param = params[target].data
                if shard is not None:
                    sizes = _shard_sizes(cfg, target.split(".")[-2])
                    param = param.narrow(0, sum(sizes[:shard]), sizes[shard])
                    loaded.add(f"{target}#{shard}")
                else:
                    loaded.add(target)
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} "
                                     f"!= model {tuple(param.shape)}")
                param.copy_(tensor.to(dtype))
    missing = []
    for name in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fused = name.split(".")[-2]
        n = len(_shard_sizes(cfg, fused)) if fused in ("qkv_proj", "gate_up_proj") else 0
        keys = [f"{name}#{i}" for i in range(n)] if n else [name]
        missing += [k for k in keys if k not in loaded]
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:4]}"
        )
    return model.eval(), cfg
