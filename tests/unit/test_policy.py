"""Router policy: which worker(s) a request goes to under each strategy."""

from __future__ import annotations

import pytest

from common.protocol import Heartbeat
from services.router.policy import ADAPTIVE_MIN_PROMPT_TOKENS, Decision, RulePolicy, WorkerView


def view(name, role, device="cpu", running=0, free_blocks=100, transports=("shm_ring",)):
    return WorkerView(Heartbeat(worker=name, role=role, device=device, num_running=running,
                                num_free_blocks=free_blocks, block_size=16,
                                transports=list(transports)))


MESH = [view("c0", "collocated"), view("p0", "prefill"), view("d0", "decode"),
        view("d1", "decode", free_blocks=300)]
LONG, SHORT = ADAPTIVE_MIN_PROMPT_TOKENS + 10, 5


def test_adaptive_sends_long_prompts_apart_and_short_ones_together():
    pol = RulePolicy("adaptive")
    d = pol.decide(LONG, 1, "auto", MESH)
    assert d == Decision("disaggregated", prefill="p0", decode="d1", transport="shm_ring",
                         reason=d.reason)
    assert pol.decide(SHORT, 1, "auto", MESH).route == "collocated"
    assert pol.decide(LONG, 2, "auto", MESH).route == "collocated"  # n > 1 forks on one worker


def test_request_route_overrides_strategy():
    pol = RulePolicy("collocated")
    assert pol.decide(SHORT, 1, "disaggregated", MESH).route == "disaggregated"
    assert RulePolicy("disaggregated").decide(LONG, 1, "collocated", MESH).worker == "c0"


def test_impossible_routes_say_why():
    pol = RulePolicy("adaptive")
    assert "n > 1" in pol.decide(LONG, 2, "disaggregated", MESH)
    only_colloc = [view("c0", "collocated")]
    assert "no prefill/decode pair" in pol.decide(LONG, 1, "disaggregated", only_colloc)
    assert pol.decide(LONG, 1, "auto", []) == "no healthy worker"


def test_load_and_free_kv_pick_the_workers():
    mesh = [view("c0", "collocated", running=5), view("c1", "collocated", running=1),
            view("p0", "prefill", running=3), view("p1", "prefill"),
            view("d0", "decode", free_blocks=2), view("d1", "decode", free_blocks=50)]
    pol = RulePolicy("adaptive")
    assert pol.decide(SHORT, 1, "collocated", mesh).worker == "c1"
    d = pol.decide(LONG, 1, "auto", mesh)
    assert (d.prefill, d.decode) == ("p1", "d1")
    # d0 cannot hold the prompt; d1 excluded after a refusal: falls back to collocated
    assert pol.decide(LONG, 1, "auto", mesh, exclude_decode={"d1"}).route == "collocated"


@pytest.mark.parametrize("devices, want", [(("cuda:0", "cuda:1"), "cuda_ipc"),
                                           (("cuda:0", "cpu"), "shm_ring")])
def test_transport_follows_devices(devices, want):
    both = ("shm_ring", "cuda_ipc")
    mesh = [view("p0", "prefill", devices[0], transports=both),
            view("d0", "decode", devices[1], transports=both if devices[1] != "cpu"
                 else ("shm_ring",))]
    assert RulePolicy("disaggregated").decide(LONG, 1, "auto", mesh).transport == want
