"""Chat with a running mesh through the official OpenAI client: the gateway serves
/v1/chat/completions, /v1/completions and /v1/models, with SSE streaming.

    nanopd up                                  # or: make up
    python examples/openai_client.py "What is the capital of France?"
"""

from __future__ import annotations

import argparse

from openai import APIConnectionError, OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="the gateway's HTTP address (config: [gateway] http)")
    parser.add_argument("--model", default=None, help="default: the one the gateway lists")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most")
    args = parser.parse_args()

    # the gateway checks no key; the client insists on one
    client = OpenAI(base_url=args.base_url, api_key="nanopd", timeout=120.0, max_retries=0)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]

    reply = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=args.max_tokens, temperature=0.0)
    print(reply.choices[0].message.content)
    if reply.usage:
        print(f"({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} "
              f"completion tokens, finish: {reply.choices[0].finish_reason})")

    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=args.max_tokens, temperature=0.0)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    try:
        main()
    except APIConnectionError as e:
        raise SystemExit(f"cannot reach the gateway ({e}); is the mesh up? (nanopd status)") from e
