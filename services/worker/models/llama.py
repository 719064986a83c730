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

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Attention of x (normed hidden states)."""
        lin = self.qkv_proj
        if (not self.qk_norm and fused_ops.enabled(x)
                and gemv_ops.fuse_enabled(x, lin.weight, lin.bias)):
            # decode steps of one sequence: rotary and the KV store in the GEMV's epilogue
            qkv = gemv_ops.linear_rotary_store_kv(
                x, lin.weight, lin.bias, positions, self.rotary.cos, self.rotary.sin,
                self.num_heads, self.num_kv_heads, self.head_dim, self.k_cache, self.v_cache,
                meta.slot_mapping)
            q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        else:
            q = self._rotary_store_kv(positions, lin(x), meta)
        o = attn_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.flatten(1))

    def _rotary_store_kv(self, positions: torch.Tensor, qkv: torch.Tensor,
                         meta: AttnMetadata) -> torch.Tensor:
        """q of qkv, rotated (after Qwen3's q/k norm), with k and v stored in their slots."""
        if fused_ops.enabled(qkv) and fused_ops.rotary_supported(qkv, self.head_dim):
            # one kernel: q/k norm, rotary in place in qkv, k and v into their slots
            norms = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                     if self.qk_norm else (None, None, 0.0))
            fused_ops.rotary_store_kv(
                qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads,
                self.num_kv_heads, self.head_dim, self.k_cache, self.v_cache,
                meta.slot_mapping, *norms)
            return qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        attn_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return q


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.gate_up_proj
        if gemv_ops.fuse_enabled(x, up.weight, up.bias):  # decode steps of one sequence
            return self.down_proj(gemv_ops.linear_silu_and_mul(x, up.weight, up.bias))
        return self.down_proj(self.act(up(x)))


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
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


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
