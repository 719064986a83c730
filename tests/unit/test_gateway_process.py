"""`python -m services.gateway --config PATH` as a real process: ready, serving, and a clean
exit on SIGTERM that aborts what is in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from common.config import MeshConfig
from common.protocol import AbortRequest, Error, RouteRequest
from tests.unit.gateway_mesh import HOLD_SEED, FakeRouter, free_port, recv, submit

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_process_serves_and_exits_cleanly_on_sigterm(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("tiny-qwen3")
    zmq_addr, http_addr = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "mesh.toml"
    config.write_text(
        f'model = "{model_dir}"\nrun_dir = "{tmp_path / "run"}"\n'
        f'[gateway]\nzmq = "{zmq_addr}"\nhttp = "{http_addr}"\n'
        '[[workers]]\nname = "colloc0"\nrole = "collocated"\n'
    )
    cfg = MeshConfig.load(config)
    cfg.run_path.mkdir(parents=True)
    router = FakeRouter(cfg, reply_ids=[], eos_id=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway", "--config", str(config)],
                            cwd=REPO, env=env)
    status = cfg.run_path / "status" / "gateway.json"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        deadline = time.monotonic() + 60
        while not status.exists():
            assert proc.poll() is None, "the gateway exited during startup"
            assert time.monotonic() < deadline, "the gateway never wrote its status"
            time.sleep(0.1)
        info = json.loads(status.read_text())
        assert info["pid"] == proc.pid and info["http"] == f"http://{http_addr}"
        with urllib.request.urlopen(f"http://{http_addr}/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}

        sock.connect(zmq_addr)
        acc = submit(sock, prompt="hello", sampling={"seed": HOLD_SEED})
        router.expect(RouteRequest, acc.rid)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        err = recv(sock)
        assert isinstance(err, Error) and err.rid == acc.rid and err.code == 503
        router.expect(AbortRequest, acc.rid)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - start < 2.5
        assert not status.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        ctx.term()
        router.close()
