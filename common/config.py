"""The mesh's configuration: one TOML file names the model, the services and their ports.

```toml
model = ""                       # HF folder; empty: the embedded default model
run_dir = "~/.cache/nanopd/run"  # sockets, pid files, logs
strategy = "adaptive"            # collocated | disaggregated | adaptive

[gateway]
zmq = "tcp://127.0.0.1:5555"
http = "127.0.0.1:8000"

[[workers]]
name = "colloc0"
role = "collocated"              # collocated | prefill | decode
device = "cpu"                   # cpu | cuda:N
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

ROLES = ("collocated", "prefill", "decode")
STRATEGIES = ("collocated", "disaggregated", "adaptive")


class ConfigError(ValueError):
    pass


@dataclass
class WorkerConfig:
    name: str
    role: str
    device: str = "cpu"
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig overrides
    threads: int | None = None  # CPU threads for torch; None: cores / CPU workers


@dataclass
class MeshConfig:
    model: str = ""
    run_dir: str = "~/.cache/nanopd/run"
    strategy: str = "adaptive"
    gateway_zmq: str = "tcp://127.0.0.1:5555"
    gateway_http: str = "127.0.0.1:8000"
    workers: list[WorkerConfig] = field(default_factory=list)
    heartbeat_s: float = 0.5
    request_timeout_s: float = 600.0
    kv_lease_s: float = 30.0

    @property
    def run_path(self) -> Path:
        return Path(os.path.expanduser(self.run_dir))

    def ipc(self, name: str) -> str:
        return f"ipc://{self.run_path / (name + '.sock')}"

    @property
    def router_inbox(self) -> str:
        return self.ipc("router")

    @property
    def gateway_inbox(self) -> str:
        return self.ipc("gateway")

    def worker_inbox(self, name: str) -> str:
        return self.ipc(f"worker-{name}")

    def worker(self, name: str) -> WorkerConfig:
        for w in self.workers:
            if w.name == name:
                return w
        raise ConfigError(f"no worker named {name!r}; workers: {[w.name for w in self.workers]}")

    def validate(self) -> MeshConfig:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if not self.workers:
            raise ConfigError("no workers configured; add at least one [[workers]] table")
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names):
            raise ConfigError(f"worker names must be unique, got {names}")
        for w in self.workers:
            if w.role not in ROLES:
                raise ConfigError(f"worker {w.name}: role {w.role!r}; allowed: {', '.join(ROLES)}")
            if not (w.device == "cpu" or w.device.startswith("cuda:")):
                raise ConfigError(f"worker {w.name}: device {w.device!r}; allowed: cpu, cuda:N")
        roles = {w.role for w in self.workers}
        if "prefill" in roles and "decode" not in roles:
            raise ConfigError("prefill workers need at least one decode worker")
        if "decode" in roles and "prefill" not in roles:
            raise ConfigError("decode workers need at least one prefill worker")
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MeshConfig:
        raw = dict(raw)
        gw = raw.pop("gateway", {}) or {}
        workers = [WorkerConfig(**w) for w in raw.pop("workers", [])]
        known = {f for f in cls.__dataclass_fields__} - {"workers", "gateway_zmq", "gateway_http"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**raw, workers=workers)
        cfg.gateway_zmq = gw.get("zmq", cfg.gateway_zmq)
        cfg.gateway_http = gw.get("http", cfg.gateway_http)
        return cfg.validate()

    @classmethod
    def load(cls, path: str | Path | None) -> MeshConfig:
        if path is None:
            return default_config()
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(raw)


def default_config() -> MeshConfig:
    """No GPU: one collocated, one prefill and one decode worker on the CPU.
    With GPUs: one worker per GPU (1 GPU: collocated; 2+: half prefill, half decode)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        workers = [WorkerConfig("colloc0", "collocated"), WorkerConfig("prefill0", "prefill"),
                   WorkerConfig("decode0", "decode")]
    elif n == 1:
        workers = [WorkerConfig("colloc0", "collocated", "cuda:0")]
    else:
        half = n // 2
        workers = [WorkerConfig(f"prefill{i}", "prefill", f"cuda:{i}") for i in range(half)]
        workers += [
            WorkerConfig(f"decode{i - half}", "decode", f"cuda:{i}") for i in range(half, n)
        ]
    return MeshConfig(workers=workers).validate()
