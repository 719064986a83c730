"""The native client against a stand-in gateway: a ROUTER socket in a thread that answers
each Submit with a scripted list of messages."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from click.testing import CliRunner

from common.protocol import Abort, Accepted, Error, Message, Submit, TokenDelta, decode, encode
from services.cli import main
from services.client import Client, ClientTimeout, GatewayError

Script = Callable[[Submit], list[Message]]


class StandInGateway:
    """Binds a ROUTER on a free port; records what it receives; replies as `script` says."""

    def __init__(self, script: Script):
        self.script = script
        self.received: list[Message] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            msg = decode(frames)
            self.received.append(msg)
            if isinstance(msg, Submit):
                for reply in self.script(msg):
                    self.sock.send_multipart([identity, *encode(reply)])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def gateway() -> Iterator[Callable[[Script], StandInGateway]]:
    made: list[StandInGateway] = []

    def make(script: Script) -> StandInGateway:
        made.append(StandInGateway(script))
        return made[-1]

    yield make
    for g in made:
        g.close()


def answer(pieces: list[str]) -> Script:
    """Accepted, then the pieces as deltas (in one delta when the submit does not stream)."""

    def script(sub: Submit) -> list[Message]:
        texts = pieces if sub.stream else ["".join(pieces)]
        out: list[Message] = [Accepted(rid="r1", client_tag=sub.client_tag, num_prompt_tokens=7)]
        for i, text in enumerate(texts):
            last = i == len(texts) - 1
            out.append(TokenDelta(rid="r1", token_ids=[100 + i], text=text,
                                  finish_reason="stop" if last else None))
        return out
    return script


def test_stream_yields_deltas_in_order_and_sends_a_chat_submit(gateway):
    g = gateway(answer(["The", " capital", " is Paris."]))
    with Client(g.address, timeout_s=5) as client:
        deltas = list(client.stream("What is the capital of France?", max_tokens=8,
                                    temperature=0.0, route="collocated"))
        assert client.accepted is not None and client.accepted.num_prompt_tokens == 7
    assert [d.text for d in deltas] == ["The", " capital", " is Paris."]
    assert deltas[-1].finish_reason == "stop"
    sub = g.received[0]
    assert isinstance(sub, Submit) and sub.stream and sub.route == "collocated"
    assert sub.prompt is None
    assert sub.messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert sub.sampling == {"max_tokens": 8, "temperature": 0.0}


def test_generate_collects_the_whole_answer_and_raw_sends_the_prompt(gateway):
    g = gateway(answer(["Paris", "."]))
    with Client(g.address, timeout_s=5) as client:
        out = client.generate("Capital of France:", chat=False, top_k=None)
    assert (out.rid, out.text, out.finish_reason, out.num_prompt_tokens) == (
        "r1", "Paris.", "stop", 7)
    sub = g.received[0]
    assert not sub.stream and sub.prompt == "Capital of France:" and sub.messages is None
    assert sub.sampling == {}


def test_generate_with_n_2_waits_for_both_completions(gateway):
    g = gateway(lambda sub: [Accepted(rid="r2", client_tag=sub.client_tag),
                             TokenDelta(rid="r2", index=1, text="B", finish_reason="length"),
                             TokenDelta(rid="r2", index=0, text="A", token_ids=[5]),
                             TokenDelta(rid="r2", index=0, text="a", finish_reason="stop")])
    with Client(g.address, timeout_s=5) as client:
        out = client.generate("hi", n=2)
    assert (out.text, out.texts, out.token_ids, out.finish_reason) == ("Aa", ["Aa", "B"], [5],
                                                                       "stop")


def test_error_raises_with_the_gateways_message(gateway):
    g = gateway(lambda sub: [Error(message="prompt has 9000 tokens; max_model_len is 4096",
                                   code=413)])
    with Client(g.address, timeout_s=5) as client, pytest.raises(GatewayError) as e:
        client.generate("hi")
    assert e.value.code == 413 and "max_model_len is 4096" in str(e.value)


def test_timeout_says_where_it_waited_and_what_to_check(gateway):
    g = gateway(lambda sub: [])
    with Client(g.address, timeout_s=0.2) as client, pytest.raises(ClientTimeout) as e:
        client.generate("hi")
    assert str(e.value) == (f"no answer from the gateway at {g.address} within 0.2 s; "
                            "is the mesh up? (nanopd status)")


def test_a_stalled_stream_is_aborted_at_the_gateway(gateway):
    g = gateway(lambda sub: [Accepted(rid="r9", client_tag=sub.client_tag),
                             TokenDelta(rid="r9", text="Par")])
    with Client(g.address, timeout_s=0.3) as client:
        stream = client.stream("hi")
        assert next(stream).text == "Par"
        with pytest.raises(ClientTimeout, match="accepted request r9 but sent nothing"):
            next(stream)
    g.stopping.wait(0.3)
    assert isinstance(g.received[-1], Abort) and g.received[-1].rid == "r9"


def test_cli_submit_prints_the_answer_streams_and_fails_on_error(gateway, tmp_path):
    ok = gateway(answer(["Paris", " is", " the capital."]))
    cli = CliRunner()
    where = ["--run-dir", str(tmp_path)]
    result = cli.invoke(main, ["submit", "--address", ok.address, *where, "Capital?"])
    assert result.exit_code == 0 and result.output == "Paris is the capital.\n", result.output
    result = cli.invoke(main, ["submit", "--address", ok.address, *where, "--stream", "Capital?"])
    assert result.exit_code == 0 and result.output == "Paris is the capital.\n"
    result = cli.invoke(main, ["submit", "--address", ok.address, *where, "--json", "Capital?"])
    record = json.loads(result.output)
    assert record["text"] == "Paris is the capital." and record["token_ids"] == [100]
    result = cli.invoke(main, ["submit", "--address", ok.address, *where, "--stream", "--json",
                               "--max-tokens", "3", "--route", "disaggregated", "Capital?"])
    assert [json.loads(line)["text"] for line in result.output.splitlines()] == [
        "Paris", " is", " the capital."]
    assert ok.received[-1].sampling == {"max_tokens": 3, "temperature": 0.0}
    assert ok.received[-1].route == "disaggregated"

    bad = gateway(lambda sub: [Error(message="route 'x'; allowed: auto", code=400)])
    result = cli.invoke(main, ["submit", "--address", bad.address, *where, "hi"])
    assert result.exit_code == 1 and "route 'x'; allowed: auto" in result.output
    silent = gateway(lambda sub: [])
    result = cli.invoke(main, ["submit", "--address", silent.address, *where, "--timeout", "0.2",
                               "hi"])
    assert result.exit_code == 1
    assert f"no answer from the gateway at {silent.address} within 0.2 s" in result.output


def test_the_zmq_example_runs_against_a_gateway(gateway, monkeypatch, capsys):
    from examples import zmq_client

    g = gateway(answer(["Paris", "."]))
    monkeypatch.setattr("sys.argv", ["zmq_client.py", "--address", g.address, "Capital?"])
    assert zmq_client.main() == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["Paris.", "Paris."]
    assert [m.route for m in g.received] == ["auto", "disaggregated"]
