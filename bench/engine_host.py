"""The engine's host time per decode step, with the model's compute taken out.

Every step of `LLMEngine.step` also runs Python on the host: scheduling, the block manager,
the runner's inputs (token ids, positions, slots, context lengths, block tables), sampling,
stop checks. On a GPU that time adds to the step unless it hides behind the previous step's
kernels, and at large batches it grows with the batch and (where something walks a block
table) with the context. Here the model is replaced by one that returns zeros at once, so a
step's wall time is that host work alone (the runner's eager path: CPU tensors).

    python3 bench/engine_host.py --seqs 64 --context 4096 --out engine_host.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from services.worker.engine import LLM, SamplingParams  # noqa: E402
from services.worker.models.random_model import tiny_test_model  # noqa: E402


class ZeroModel(torch.nn.Module):
    """Stands in for CausalLM: hidden states and logits of the right shapes, all zeros."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], self.vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=4096, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=200, help="decode steps timed")
    p.add_argument("--reps", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_test_model("tiny-qwen2", Path(tmp), None)
        max_len = args.context + args.steps * (args.reps + 1) + 64
        blocks = args.seqs * (-(-max_len // 16)) + 64
        llm = LLM(str(path), num_kv_blocks=blocks, max_num_seqs=args.seqs,
                  max_model_len=max_len, max_num_batched_tokens=max(8192, args.context))
        engine = llm.engine
        cfg = engine.model_config
        engine.runner.model = ZeroModel(cfg.hidden_size, cfg.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=max_len, ignore_eos=True)
        for i in range(args.seqs):
            prompt = [1 + (i + j) % (cfg.vocab_size - 1) for j in range(args.context)]
            engine.add_request(f"r{i}", prompt, params)
        while any(s.num_computed_tokens < s.num_prompt_tokens
                  for group in engine.seqs.values() for s in group):
            engine.step()  # the prefill steps
        for _ in range(20):
            engine.step()
        runs = []
        for _ in range(args.reps):
            start = time.perf_counter()
            for _ in range(args.steps):
                assert len(engine.step()) == args.seqs
            runs.append((time.perf_counter() - start) / args.steps * 1e3)
    result = {"bench": "engine_host", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "seqs": args.seqs, "context": args.context,
              "steps": args.steps, "ms_per_step_runs": runs,
              "ms_per_step": sorted(runs)[len(runs) // 2]}
    print(f"{args.seqs} sequences, {args.context} tokens of context: "
          f"{result['ms_per_step']:.3f} ms of host time a decode step (runs {runs})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
