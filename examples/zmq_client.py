"""Talk to a running mesh through the gateway's native ZMQ frontend.

    nanopd up                                  # or: make up
    python examples/zmq_client.py              # after `make install` (services is importable)
    python examples/zmq_client.py --address tcp://10.0.0.5:5555 "Tell me a joke"

`Client` is one DEALER socket to the gateway's ROUTER. `generate` waits for the whole answer;
`stream` yields TokenDeltas as the workers produce them. Every wait has a timeout, and a
request the client gives up on is aborted at the gateway.
"""

from __future__ import annotations

import argparse

from services.client import DEFAULT_ADDRESS, Client, ClientError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="the gateway's ZMQ address")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per answer")
    args = parser.parse_args()

    try:
        with Client(args.address, timeout_s=args.timeout) as client:
            # one answer at once: chat template applied by the gateway, greedy sampling
            out = client.generate(args.prompt, max_tokens=32, temperature=0.0)
            print(f"[{out.rid}] {out.num_prompt_tokens} prompt tokens, "
                  f"{len(out.token_ids)} new, finish: {out.finish_reason}")
            print(out.text.strip())

            # the same prompt streamed, sampled, and forced through a prefill + decode pair
            for delta in client.stream(args.prompt, max_tokens=32, temperature=0.7, seed=1,
                                       route="disaggregated"):
                print(delta.text, end="", flush=True)
            print()
    except ClientError as e:  # timeout, or the gateway's Error (bad parameters, overload, ...)
        print(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
