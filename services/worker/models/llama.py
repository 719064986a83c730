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

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttnMetadata,
                norm: gemv_ops.Norm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor | gemv_ops.Summed:
        """Attention of x (normed hidden states; with a `norm`, the residual stream, which the
        qkv GEMV norms as it reads it). With `residual`, o_proj's GEMV adds its output into it
        and this returns the new residual's `Summed` (DecoderLayer's fused form)."""
        lin = self.qkv_proj
        if not self.qk_norm and (norm is not None or (
                fused_ops.enabled(x) and gemv_ops.fuse_enabled(x, lin.weight, lin.bias))):
            # decode steps of one sequence: rotary and the KV store in the GEMV's epilogue
            qkv = gemv_ops.linear_rotary_store_kv(
                x, lin.weight, lin.bias, positions, self.rotary.cos, self.rotary.sin,
                self.num_heads, self.num_kv_heads, self.head_dim, self.k_cache, self.v_cache,
                meta.slot_mapping, norm)
            q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        else:
            qkv = lin(x) if norm is None else gemv_ops.linear_normed(x, lin.weight, lin.bias,
                                                                      norm)
            q = self._rotary_store_kv(positions, qkv, meta)
        o = attn_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale).flatten(1)
        if residual is not None:
            return gemv_ops.linear_add(o, self.o_proj.weight, self.o_proj.bias, residual)
        return self.o_proj(o)

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

    def forward(self, x: torch.Tensor, norm: gemv_ops.Norm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor | gemv_ops.Summed:
        """MLP of x (normed; with a `norm`, the residual stream, normed by gate_up's GEMV).
        With `residual`, down_proj's GEMV adds into it and this returns its `Summed`."""
        up = self.gate_up_proj
        if norm is not None or gemv_ops.fuse_enabled(x, up.weight, up.bias):
            h = gemv_ops.linear_silu_and_mul(x, up.weight, up.bias, norm)  # one sequence
        else:
            h = self.act(up(x))
        if residual is not None:
            return gemv_ops.linear_add(h, self.down_proj.weight, self.down_proj.bias, residual)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._weights_ok: dict[tuple[torch.device, torch.dtype], bool] = {}

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor | gemv_ops.Summed,
        residual: torch.Tensor | None, meta: AttnMetadata,
    ) -> tuple[torch.Tensor | gemv_ops.Summed, torch.Tensor]:
        """(h, residual) in, (h, residual) out, where the layer's input is h + residual
        (residual None: the first layer, whose input is h). The sums are today's
        `h + attn(norm(h))` and `h + mlp(norm(h))` with the same roundings.

        Fused form (decode steps of one sequence, `gemv_ops.norms_fusable`): o_proj and
        down_proj add into the residual in their GEMVs' epilogues and the norms are made by
        the qkv and gate_up GEMVs as they read the residual stream, so h comes back as a
        `gemv_ops.Summed` (the add is done; its sums of squares ride along)."""
        x = residual if residual is not None else h
        fuse = gemv_ops.norms_fusable(x, self._weights_fusable(x))
        norm = None
        if isinstance(h, gemv_ops.Summed):
            if fuse:
                w = self.input_layernorm
                norm, h = gemv_ops.Norm(h.sums, w.weight, w.eps), residual
            else:
                h = self.input_layernorm(residual)
        elif residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        if fuse:
            summed = self.self_attn(positions, h, meta, norm, residual)
            w = self.post_attention_layernorm
            return self.mlp(residual, gemv_ops.Norm(summed.sums, w.weight, w.eps),
                            residual), residual
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def _weights_fusable(self, x: torch.Tensor) -> bool:
        """gemv_ops.weight_ok of the four projections for x's device and dtype, once."""
        key = (x.device, x.dtype)
        if key not in self._weights_ok:
            a, m = self.self_attn, self.mlp
            self._weights_ok[key] = all(
                gemv_ops.weight_ok(x, lin.weight, lin.bias)
                for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj))
        return self._weights_ok[key]


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
        if residual is None:
            return self.norm(h)
        if isinstance(h, gemv_ops.Summed):  # the last add is in residual already
            return self.norm(residual)
        return self.norm(h, residual)[0]


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
