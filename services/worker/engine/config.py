"""Engine settings, with the checks that turn a bad setting into a clear error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder; None: the embedded default model
    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's dtype on GPU, float32 on CPU
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 0.25
    seed: int = 0
    enforce_eager: bool = False  # True: no CUDA graphs (decode steps launch kernel by kernel)
    max_graph_batch_size: int = 256  # decode batches up to this size replay a CUDA graph

    def __post_init__(self) -> None:
        checks = [
            (self.block_size in (8, 16, 32, 64, 128), "block_size", "one of 8, 16, 32, 64, 128"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", ">= 1"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", ">= 1"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "in (0, 1]"),
            (self.cpu_kv_cache_gib > 0, "cpu_kv_cache_gib", "> 0"),
            (1 <= self.max_graph_batch_size <= 1024, "max_graph_batch_size", "in [1, 1024]"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}; must be {allowed}")
