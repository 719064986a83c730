"""Decoder for the Llama, Qwen2/Qwen2.5 and Qwen3 families over the paged KV cache.

One module covers the three: Qwen2 adds QKV bias, Qwen3 adds per-head RMSNorm on q and k.
Projections are fused (q|k|v and gate|up); the loader maps checkpoint names into them.
They are ops/gemv_ops.Linear: nn.Linear whose decode-sized CUDA batches take csrc's GEMV.
Layers pass the residual stream along beside the hidden states (vLLM's form), so that each
norm is one fused add-and-norm kernel on the GPU (ops/fused_ops.py).
"""

from __future__ import annotations

import torch
from torch import nn

from services.worker.models.config import ModelConfig
from services.worker.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from services.worker.ops import attention as attn_ops
from services.worker.ops import fused_ops, gemv_ops
from services.worker.ops.attn_metadata import AttnMetadata
from services.worker.ops.fused_reference import split_qkv
from services.worker.ops.gemv_ops import Linear


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.k_cache = torch.empty(0)  # views into the runner's KV pool, set at start-up
        self.v_cache = torch.empty(0)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor | None, meta: AttnMetadata,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of x (normed hidden states), or from `qkv`, its projection, when given."""
        if qkv is None:
            qkv = self.qkv_proj(x)
        if fused_ops.enabled(qkv) and fused_ops.rotary_supported(qkv, self.head_dim):
            # one kernel: q/k norm, rotary in place in qkv, k and v into their slots
            norms = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                     if self.qk_norm else (None, None, 0.0))
            fused_ops.rotary_store_kv(
                qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads,
                self.num_kv_heads, self.head_dim, self.k_cache, self.v_cache,
                meta.slot_mapping, *norms)
            q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        else:
            q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
            attn_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = attn_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
        meta: AttnMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) in, (h, residual) out, where the layer's input is h + residual
        (residual None: the first layer, whose input is h). The sums are today's
        `h + attn(norm(h))` and `h + mlp(norm(h))` with the same roundings."""
        qkv = self.self_attn.qkv_proj
        if gemv_ops.fuse_enabled(h, qkv.weight, qkv.bias, h.shape[1]):
            return self.forward_fused(positions, h, residual, meta)
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def forward_fused(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
        meta: AttnMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for a decode step of 1-2 sequences with NANOPD_GEMV_FUSE=1: each norm is
        made inside the GEMV after it, and SwiGLU inside down_proj's (ops/gemv_ops.py)."""
        norm, qkv = self.input_layernorm, self.self_attn.qkv_proj
        qkv_out, residual = gemv_ops.add_norm_linear(h, residual, norm.weight, norm.eps,
                                                     qkv.weight, qkv.bias)
        h = self.self_attn(positions, None, meta, qkv=qkv_out)
        norm = self.post_attention_layernorm
        gate_up, down = self.mlp.gate_up_proj, self.mlp.down_proj
        if not gemv_ops.fuse_enabled(h, gate_up.weight, gate_up.bias, h.shape[1]):
            h, residual = norm(h, residual)
            return self.mlp(h), residual
        g, residual = gemv_ops.add_norm_linear(h, residual, norm.weight, norm.eps,
                                               gate_up.weight, gate_up.bias)
        if gemv_ops.fuse_enabled(g, down.weight, down.bias, g.shape[1] // 2):
            return gemv_ops.swiglu_linear(g, down.weight, down.bias), residual
        return down(self.mlp.act(g)), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, meta)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class CausalLM(nn.Module):
    """`forward` gives final hidden states for the step's tokens; `logits` projects chosen rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`[rows, vocab]` in the model's dtype; into `out` when given (a CUDA graph's
        static buffer)."""
        if out is None:
            return self.lm_head(hidden)
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
