"""CUDA graphs of decode-only steps, one per padded batch size (vLLM's scheme).

A decode step of a small batch is hundreds of short kernels; launched one by one from Python
the GPU waits on the CPU between them. Captured once per batch size and replayed, the whole
forward pass (embedding, every layer, final norm, lm_head) is a single launch.

What makes a step capturable: every input lives in a static buffer that the replay reads
(token ids, positions, KV slots, context lengths, block tables), and nothing inside the
forward pass depends on a host value of this step. The attention kernel (csrc/
paged_decode) sizes its grid from the batch alone and splits each context on the device;
the KV store skips the negative slots of padding rows; padding rows have context 0, whose
attention output is zeros. So a batch of n runs in the graph of the smallest captured size
>= n, with rows n.. as padding.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from services.worker.ops import cuda_ops
from services.worker.ops.attn_metadata import AttnMetadata, BlockTableStage

if TYPE_CHECKING:
    from services.worker.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_batch (itself included)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


def why_not_capturable(runner: ModelRunner) -> str | None:
    """None if decode steps of this runner can be captured, else the reason."""
    if runner.device.type != "cuda":
        return "the device is not a GPU"
    if cuda_ops.load() is None:
        return "the csrc kernels are not built (make kernels)"
    if os.environ.get("NANOPD_ATTN", "auto") not in ("auto", "cuda"):
        return f"NANOPD_ATTN={os.environ['NANOPD_ATTN']} chooses another attention route"
    c = runner.model_cfg
    q = torch.empty(1, c.num_heads, c.head_dim, dtype=runner.dtype, device=runner.device)
    if not cuda_ops.decode_supported(q, runner.kv_pool[0, 0]):
        return (f"paged_decode is not built for {runner.dtype}, head_dim {c.head_dim}, "
                f"{c.num_heads} query / {c.num_kv_heads} KV heads, block {runner.block_size}")
    return None


class DecodeGraphs:
    """Captured decode steps of one runner; `run` replays the right one."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int):
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch)
        dev, max_bs = runner.device, self.sizes[-1]
        self.max_blocks = -(-max_model_len // runner.block_size)
        i64, i32 = {"dtype": torch.int64, "device": dev}, {"dtype": torch.int32, "device": dev}
        # static inputs: ids | positions | slots in one int64 buffer, one copy a step
        self.longs = torch.zeros(3, max_bs, **i64)
        self.context_lens = torch.zeros(max_bs, **i32)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, **i32)
        self.logits = torch.empty(max_bs, runner.model_cfg.vocab_size, dtype=runner.dtype,
                                  device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.tables = BlockTableStage(pin=True)
        self._capture()

    def _forward(self, bs: int) -> None:
        ids, positions, slots = self.longs[0, :bs], self.longs[1, :bs], self.longs[2, :bs]
        meta = AttnMetadata(
            slot_mapping=slots, context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs], cu_seqlens_q=list(range(bs + 1)),
            context_lens_host=[1] * bs, num_decode_seqs=bs,
        )
        model = self.runner.model
        model.logits(model(ids, positions, meta), out=self.logits[:bs])

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        self.longs[2].fill_(-1)  # every row padding: no KV written while capturing
        self.context_lens.zero_()
        pool = None
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: the smaller reuse its memory
                self._forward(bs)  # warm-up: cuBLAS handles, workspaces, lazy allocations
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.sizes),
                 self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured batch size that a step of num_seqs runs in (None: too big)."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            context_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits `[num_seqs, vocab]` of one decode step (a view: use before the next run)."""
        n = len(input_ids)
        bs = self.padded_size(n)
        pad = bs - n
        longs = torch.tensor([input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad],
                             dtype=torch.int64, pin_memory=True)
        self.longs[:, :bs].copy_(longs, non_blocking=True)
        lens = torch.tensor(context_lens + [0] * pad, dtype=torch.int32, pin_memory=True)
        self.context_lens[:bs].copy_(lens, non_blocking=True)
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks; the graphs were captured for "
                             f"{self.max_blocks} (max_model_len)")
        host = self.tables.tensor(tables, width)
        self.block_tables[:n, :width].copy_(host, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[:n]
