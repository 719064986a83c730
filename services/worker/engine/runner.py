"""Owns the model and the KV pool on one device; runs one scheduled step."""

from __future__ import annotations

import logging

import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.cuda_graphs import DecodeGraphs, why_not_capturable
from services.worker.models.config import ModelConfig, parse_dtype
from services.worker.models.loader import load_model
from services.worker.ops import cuda_ops
from services.worker.ops.attn_metadata import AttnMetadata, BlockTableStage

log = logging.getLogger(__name__)


def resolve_dtype(
    config: EngineConfig, model_cfg: ModelConfig, device: torch.device
) -> torch.dtype:
    if config.dtype is not None:
        return parse_dtype(config.dtype)
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(model_cfg.torch_dtype or "bfloat16")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model_cfg = ModelConfig.from_path(model_dir)
        self.dtype = resolve_dtype(config, self.model_cfg, self.device)
        self.model, _ = load_model(model_dir, self.dtype, self.device)
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        c = self.model_cfg
        # One pool for all layers: [layer, k|v, block, slot, kv_head, head_dim]. One tensor
        # keeps the pool exportable as a single CUDA IPC handle and layer slices contiguous.
        self.kv_pool = torch.zeros(
            c.num_layers, 2, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim,
            dtype=self.dtype, device=self.device,
        )
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_pool[i, 0], self.kv_pool[i, 1]
        self.graphs: DecodeGraphs | None = None
        self.tables = BlockTableStage(pin=self.device.type == "cuda")

    def capture_graphs(self, max_model_len: int) -> None:
        """CUDA graphs for decode-only steps (config.enforce_eager=False), if this runner's
        device, kernels and shapes allow; otherwise every step runs eagerly, and says why."""
        if self.config.enforce_eager:
            return
        reason = why_not_capturable(self)
        if reason is not None:
            if self.device.type == "cuda":
                log.warning("decode steps run without CUDA graphs: %s", reason)
            return
        max_batch = min(self.config.max_num_seqs, self.config.max_graph_batch_size)
        self.graphs = DecodeGraphs(self, max_batch, max_model_len)

    @property
    def kv_bytes_per_block(self) -> int:
        c = self.model_cfg
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cpu":
            budget = int(self.config.cpu_kv_cache_gib * 2**30)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            c = self.model_cfg
            # transient peak of the torch attention path: gathered K/V for a full decode batch
            ctx = min(self.config.max_model_len or c.max_position_embeddings, 8192)
            group = c.num_heads // c.num_kv_heads
            elem = torch.tensor([], dtype=self.dtype).element_size()
            gathered = self.config.max_num_seqs * ctx * c.num_kv_heads * c.head_dim * elem * 2
            transient = gathered * (1 + group) + 2**30
            budget = int(free - (1 - self.config.gpu_memory_utilization) * total - transient)
        num = budget // self.kv_bytes_per_block
        if num < 1:
            raise RuntimeError(
                f"no memory left for the KV cache on {self.device} "
                f"(budget {budget / 2**30:.2f} GiB); lower max_num_seqs or free memory"
            )
        return int(num)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers, K and V) src -> dst (fresh blocks,
        never a src): csrc's copy_blocks in one launch on a GPU when built, else torch indexing."""
        if copies and self.device.type == "cuda" and cuda_ops.load() is not None:
            cuda_ops.copy_blocks(self.kv_pool, self.kv_pool, [s for s, _ in copies],
                                 [d for _, d in copies])
        elif copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_pool[:, :, dst] = self.kv_pool[:, :, src]

    @torch.inference_mode()
    def run(
        self, batch: list[tuple[list[int], int, int, list[int]]], sample_rows: list[int]
    ) -> torch.Tensor:
        """One forward step.

        `batch`: per sequence, (its new token ids, position of the first, context length after
        the step, its block table); decode sequences (one new token) first. Returns the logits
        of the last new token of each sequence listed in `sample_rows`.
        """
        bs = self.block_size
        if self.graphs is not None and all(len(t) == 1 for t, _, _, _ in batch) and (
                self.graphs.padded_size(len(batch)) is not None):  # decode: replay a graph
            logits = self.graphs.run(
                [t[0] for t, _, _, _ in batch], [p for _, p, _, _ in batch],
                [table[p // bs] * bs + p % bs for _, p, _, table in batch],
                [c for _, _, c, _ in batch], [table for _, _, _, table in batch])
            return logits if len(sample_rows) == len(batch) else logits[sample_rows]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx_lens: list[int] = []
        num_decode = 0
        max_blocks = max(len(bt) for _, _, _, bt in batch)
        for tokens, start, ctx, table in batch:
            n = len(tokens)
            num_decode += n == 1 and num_decode == len(ctx_lens)
            input_ids += tokens
            pos = range(start, start + n)
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            cu.append(cu[-1] + n)
            ctx_lens.append(ctx)
        dev = self.device

        def t(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, pin_memory=dev.type == "cuda").to(
                dev, non_blocking=True
            )

        meta = AttnMetadata(
            slot_mapping=t(slots, torch.int64),
            context_lens=t(ctx_lens, torch.int32),
            block_tables=self.tables.tensor([bt for _, _, _, bt in batch], max_blocks).to(
                dev, non_blocking=True),
            cu_seqlens_q=cu,
            context_lens_host=ctx_lens,
            num_decode_seqs=num_decode,
            cu_seqlens_q_dev=t(cu, torch.int32) if dev.type == "cuda" else None,
            max_q=max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        )
        hidden = self.model(t(input_ids, torch.int64), t(positions, torch.int64), meta)
        last = torch.tensor([cu[i + 1] - 1 for i in sample_rows], dtype=torch.long, device=dev)
        return self.model.logits(hidden[last])
