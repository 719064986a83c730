"""KV transports: move KV blocks from a prefill worker's pool to a decode worker's.

    t = make_transport("shm_ring", runner.kv_pool, worker="prefill-0")
"""

from __future__ import annotations

from typing import Any

import torch

from common.transport.base import KvTransport, TransportError
from common.transport.cuda_ipc import CudaIpcTransport
from common.transport.shm_ring import ShmRingTransport

TRANSPORTS: dict[str, type[KvTransport]] = {
    ShmRingTransport.name: ShmRingTransport,
    CudaIpcTransport.name: CudaIpcTransport,
}


def make_transport(name: str, kv_pool: torch.Tensor, **kw: Any) -> KvTransport:
    """The transport called `name` over this worker's pool; `kw` go to its constructor."""
    cls = TRANSPORTS.get(name)
    if cls is None:
        raise TransportError(f"unknown KV transport {name!r}; choose one of {sorted(TRANSPORTS)}")
    return cls(kv_pool, **kw)


def transports_for(device: torch.device) -> list[str]:
    """The transports a worker whose pool is on `device` can offer (for its Heartbeat)."""
    return ["cuda_ipc", "shm_ring"] if device.type == "cuda" else ["shm_ring"]


__all__ = ["CudaIpcTransport", "KvTransport", "ShmRingTransport", "TRANSPORTS",
           "TransportError", "make_transport", "transports_for"]
