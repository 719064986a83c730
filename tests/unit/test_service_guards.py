"""A bug while handling one message fails that request with a clear error, and the service
goes on: the router's and the worker's message handlers (the gateway's: test_gateway.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from common.config import MeshConfig
from common.protocol import Error, RequestDone, RouteRequest, Run
from services.router.main import Router, Tracked
from services.worker.main import Worker


def boom(*a, **kw):
    raise RuntimeError("boom")


@pytest.fixture
def router(tmp_path):
    r = Router(MeshConfig(run_dir=str(tmp_path)))
    sent = []
    r.out.send = lambda address, msg: sent.append((address, msg))
    r.sent = sent
    yield r
    r.inbox.close()
    r.out.close()
    r.ctx.term()


def test_router_untracked_request_gets_a_500_at_the_gateway(router, monkeypatch):
    monkeypatch.setattr(router, "on_route", boom)
    router.handle_guarded(RouteRequest(rid="r1", token_ids=[1, 2]))
    (address, err), = router.sent
    assert address == router.gateway_address and isinstance(err, Error)
    assert err.rid == "r1" and err.code == 500 and "RuntimeError: boom" in err.message


def test_router_tracked_request_fails_and_is_forgotten(router, monkeypatch):
    decision = SimpleNamespace()
    router.requests["r2"] = Tracked(req=RouteRequest(rid="r2"), decision=decision,
                                    stage="running", deadline=time.monotonic() + 60)
    monkeypatch.setattr(router, "on_done", boom)
    router.handle_guarded(RequestDone(rid="r2", worker="w"))
    assert "r2" not in router.requests and router.paths["failed"] == 1
    errs = [m for a, m in router.sent if isinstance(m, Error)]
    assert errs and errs[0].code == 500 and errs[0].rid == "r2"


def test_worker_bug_in_a_run_fails_that_leg():
    failed = []
    stub = SimpleNamespace(name="w0", on_run=boom, fail=lambda rid, e: failed.append((rid, e)))
    Worker.handle(stub, Run(rid="r3", token_ids=[1]))
    (rid, error), = failed
    assert rid == "r3" and "internal error in worker w0: RuntimeError: boom" in error
