"""The whole mesh as real processes on the CPU: `up` with the default config, then serve."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.config import MeshConfig, default_config
from services import launcher
from services.client import Client, GatewayError
from services.launcher_config import dump_toml

PROMPT = "What is the capital of France?"
PREFILL_BUDGET_TOKENS = 16  # a token budget that makes PROMPT take several prefill steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """The default CPU config (embedded model; collocated, prefill, decode workers) with
    its own run dir and free ports, so it never meets another mesh."""
    root = tmp_path_factory.mktemp("mesh")
    cfg = default_config()
    cfg.run_dir = str(root / "run")
    cfg.gateway_zmq = f"tcp://127.0.0.1:{free_port()}"
    cfg.gateway_http = f"127.0.0.1:{free_port()}"
    cfg.heartbeat_s = 0.2
    path = root / "mesh.toml"
    path.write_text(dump_toml(cfg))
    launcher.up(str(path), timeout_s=300, echo=lambda *a: None)
    time.sleep(1.0)  # first heartbeats reach the router
    yield cfg
    launcher.down(cfg.run_dir)
    assert not list((Path(cfg.run_dir) / "status").glob("*.json"))


def client(cfg) -> Client:
    return Client(cfg.gateway_zmq, timeout_s=120)


def statuses(cfg) -> dict[str, dict]:
    d = Path(cfg.run_dir) / "status"
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}


@pytest.fixture(scope="module")
def offline():
    """The offline engine's greedy answer to PROMPT: (prompt token ids, output token ids)."""
    from services.worker.engine import LLM, SamplingParams

    llm = LLM()
    want = llm.generate([llm.chat_prompt(PROMPT)], SamplingParams(temperature=0, max_tokens=24))
    return want[0].prompt_token_ids, want[0].token_ids


def test_every_route_gives_the_offline_engine_greedy_tokens(mesh, offline):
    for route in ("collocated", "disaggregated", "auto"):
        with client(mesh) as c:
            got = c.generate(PROMPT, route=route, temperature=0, max_tokens=24)
        assert got.token_ids == offline[1], route
        assert "Paris" in got.text
    paths = statuses(mesh)["router"]["paths"]
    assert paths.get("collocated", 0) >= 1 and paths.get("disaggregated", 0) >= 1


def test_openai_client_streaming_and_not(mesh):
    from openai import OpenAI

    oai = OpenAI(base_url=f"http://{mesh.gateway_http}/v1", api_key="unused")
    msgs = [{"role": "user", "content": PROMPT}]
    whole = oai.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    stream = oai.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0,
                                         stream=True, extra_body={"route": "disaggregated"})
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    comp = oai.completions.create(model="m", prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    assert comp.usage.completion_tokens == 5


def test_32_concurrent_disaggregated_requests_decode_together(mesh):
    def one(i: int):
        with client(mesh) as c:
            return c.generate(f"Count from {i} upwards.", route="disaggregated",
                              temperature=0, max_tokens=96, ignore_eos=True)

    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, range(32)))
    assert all(len(o.token_ids) == 96 and o.finish_reason == "length" for o in outs)
    assert statuses(mesh)["decode0"]["peak_batch_seqs"] >= 32


def test_bad_input_gets_a_clear_error_and_the_mesh_serves_on(mesh):
    with client(mesh) as c, pytest.raises(GatewayError, match="temperature"):
        c.generate(PROMPT, temperature=-1.0)
    with client(mesh) as c:
        assert "Paris" in c.generate(PROMPT, temperature=0, max_tokens=16).text


def restart_and_ask(mesh, name: str, max_tokens: int):
    old = statuses(mesh)[name]["pid"]
    launcher.restart(name, mesh.run_dir, timeout_s=300, echo=lambda *a: None)
    assert statuses(mesh)[name]["pid"] != old
    deadline = time.monotonic() + 30
    while True:  # the router learns the new worker from its heartbeats
        try:
            with client(mesh) as c:
                return c.generate(PROMPT, route="disaggregated", temperature=0,
                                  max_tokens=max_tokens)
        except GatewayError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_restart_a_decode_worker_and_serve_again(mesh):
    assert "Paris" in restart_and_ask(mesh, "decode0", max_tokens=16).text


def test_kv_ships_chunk_by_chunk_when_the_prompt_takes_several_prefill_steps(mesh, offline):
    """The prefill worker restarted with a token budget below the prompt's length: its KV
    goes in KvChunks while later chunks compute, then KvReady; same greedy tokens."""
    prompt_ids, want = offline
    assert len(prompt_ids) > 2 * PREFILL_BUDGET_TOKENS  # at least two chunks before KvReady
    path = Path(mesh.run_dir) / "mesh.toml"  # what `restart` starts the worker with
    cfg = MeshConfig.load(path)
    for w in cfg.workers:
        if w.role == "prefill":
            w.engine["max_num_batched_tokens"] = PREFILL_BUDGET_TOKENS
    path.write_text(dump_toml(cfg))
    assert restart_and_ask(mesh, "prefill0", max_tokens=24).token_ids == want
    deadline = time.monotonic() + 10
    while True:  # the counters reach the status files with the next heartbeats
        st = statuses(mesh)
        if st["prefill0"]["num_kv_chunks_sent"] >= 2 and st["decode0"][
                "num_kv_chunks_received"] >= 2:
            break
        assert time.monotonic() < deadline, (st["prefill0"], st["decode0"])
        time.sleep(0.2)


def test_no_kv_blocks_held_anywhere_after_all_requests(mesh):
    deadline = time.monotonic() + 20
    while True:
        st = statuses(mesh)
        workers = [s for s in st.values() if s.get("role") in ("collocated", "prefill", "decode")]
        idle = all(s["num_free_blocks"] == s["num_blocks"] and s["num_running"] == 0
                   for s in workers)
        if idle and st["router"]["in_flight"] == 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    assert len(workers) == 3
