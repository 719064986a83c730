"""One decode step of a real model shape (random weights): ours against the weight-read floor
and HF transformers, plus a prefill step and the share of it that is attention.

For each batch x context: every sequence has `context - 1` tokens of KV in scattered blocks
and decodes one token (ModelRunner.run, the engine's step without scheduling and sampling).
- floor: the bytes of weights one step reads (every linear layer, the norms, lm_head) over a
  device copy's bandwidth measured in the same run (bytes read + written, as bench/kernels.py):
  the higher of two copy references, one before the steps and one after them (a single one
  taken at the start of a process measured 4003-4206 GB/s on H200s, 2026-12-03 (23 runs),
  moving every ratio by up to 5%; the higher one is the floor the card can reach)
- ours, CUDA graph: GPU time of the replay (CUDA events) and wall time of runner.run
  (host preparation included); ours, eager: runner.run without graphs
- HF: transformers' eager forward of one token with a DynamicCache of the same context
Prefill: one prompt of --prefill-tokens, and a chunk of --chunk-tokens after a cached prefix,
timed whole (wall time to a sync, and events around the step: the GPU's clock), with the
attention calls timed by CUDA events around each (their share of the wall time).

    python3 bench/decode_step.py --out decode_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from services.worker.engine import LLM  # noqa: E402
from services.worker.models import llama  # noqa: E402
from services.worker.models.random_model import write_random_model  # noqa: E402
from services.worker.ops import cuda_ops  # noqa: E402
from services.worker.ops.flash import active_route  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b", help="a shape of random_model.SHAPES")
    p.add_argument("--batches", default="1,64", help="decode batch sizes, comma-separated")
    p.add_argument("--contexts", default="512,4096", help="context lengths, comma-separated")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="prompt of the prefill step")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="a chunk after a cached prefix of prefill-tokens - chunk-tokens")
    p.add_argument("--reps", type=int, default=20, help="timed steps; the median is reported")
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    p.add_argument("--model-dir", help="reuse (or write) the random model folder here")
    p.add_argument("--out", help="also write the results here as JSON")
    return p.parse_args(argv)


def median_ms(fn, reps: int, events: bool = False) -> float:
    """Median over reps of one call: GPU time by CUDA events, or wall time to a sync."""
    import time

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if events:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20, events=True)
    return 2 * nbytes / ms / 1e6


def weight_nbytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter once (a tied embedding is lm_head's read),
    except an untied input embedding, of which a step reads only its rows."""
    seen, total = set(), 0
    for name, prm in model.named_parameters():
        if prm.data_ptr() in seen:
            continue
        seen.add(prm.data_ptr())
        if name.endswith("embed_tokens.weight") and not model.config.tie_word_embeddings:
            continue
        total += prm.numel() * prm.element_size()
    return total


def decode_batch(runner, batch: int, context: int, rng: torch.Generator) -> list:
    """Per sequence: (one new token, its position, context after the step, a block table of
    blocks drawn at random from the pool)."""
    bs = runner.block_size
    nb = -(-context // bs)
    perm = torch.randperm(runner.num_blocks, generator=rng)[: batch * nb].view(batch, nb)
    return [([1], context - 1, context, perm[i].tolist()) for i in range(batch)]


def attention_share(runner, batch_spec: list, reps: int) -> dict[str, float]:
    """Whole prefill step (wall) and the GPU time of its attention calls (events)."""
    spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    inner = llama.attn_ops.paged_attention

    def timed_attention(*a, **kw):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = inner(*a, **kw)
        e.record()
        spans.append((s, e))
        return out

    step_ms = median_ms(lambda: runner.run(batch_spec, [0]), reps)
    # the same on the GPU's clock (events around the step): wall time above includes the
    # host's preparation, which dominates on a slow host
    step_gpu_ms = median_ms(lambda: runner.run(batch_spec, [0]), reps, events=True)
    attn = []
    llama.attn_ops.paged_attention = timed_attention
    try:
        for _ in range(reps):
            spans.clear()
            runner.run(batch_spec, [0])
            torch.cuda.synchronize()
            attn.append(sum(s.elapsed_time(e) for s, e in spans))
    finally:
        llama.attn_ops.paged_attention = inner
    a = statistics.median(attn)
    return {"step_ms": step_ms, "step_gpu_ms": step_gpu_ms, "attention_ms": a,
            "attention_share": a / step_ms, "attention_route": active_route()}


def run_ours(args, model_dir: Path, cases: list[tuple[int, int]]) -> tuple[list, dict]:
    max_ctx = max(c for _, c in cases)
    max_batch = max(b for b, _ in cases)
    need = max([b * -(-c // 16) for b, c in cases] + [-(-args.prefill_tokens // 16)]) + 64
    llm = LLM(model=str(model_dir), device="cuda:0", dtype="bfloat16", num_kv_blocks=need,
              max_num_seqs=max_batch, max_model_len=max(max_ctx, args.prefill_tokens) + 16)
    runner = llm.engine.runner
    nbytes = weight_nbytes(runner.model)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for batch, context in cases:
        spec = decode_batch(runner, batch, context, rng)
        rows_all = list(range(batch))
        row = {"batch": batch, "context": context, "weight_nbytes": nbytes}
        graphs = runner.graphs
        if graphs is not None:
            row["graph_wall_ms"] = median_ms(lambda s=spec, r=rows_all: runner.run(s, r),
                                             args.reps)
            runner.run(spec, rows_all)  # the graph's inputs now hold this batch
            g = graphs.graphs[graphs.padded_size(batch)]
            row["graph_gpu_ms"] = median_ms(g.replay, args.reps, events=True)
        runner.graphs = None
        row["eager_wall_ms"] = median_ms(lambda s=spec, r=rows_all: runner.run(s, r), args.reps)
        runner.graphs = graphs
        rows.append(row)
        print(json.dumps(row), flush=True)
    # prefill: a whole prompt, then a chunk over a cached prefix (eager: prefill is not graphed)
    n, c = args.prefill_tokens, args.chunk_tokens
    table = decode_batch(runner, 1, n, rng)[0][3]
    prefill = {"whole_prompt": attention_share(runner, [(list(range(n)), 0, n, table)],
                                               args.reps // 2 or 1),
               "chunk_after_prefix": attention_share(
                   runner, [(list(range(c)), n - c, n, table)], args.reps // 2 or 1)}
    prefill["whole_prompt"]["tokens"] = n
    prefill["chunk_after_prefix"].update(tokens=c, cached_prefix=n - c)
    print(json.dumps(prefill), flush=True)
    llm.engine = None  # the caller empties the CUDA cache once this frame is gone
    return rows, prefill


def run_hf(model_dir: Path, cases: list[tuple[int, int]], reps: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, DynamicCache

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                             attn_implementation="sdpa").to("cuda").eval()
    out = {}
    with torch.inference_mode():
        for batch, context in cases:
            key = f"{batch}x{context}"
            try:
                ids = torch.randint(0, 1000, (batch, context - 1), device="cuda")
                cache = DynamicCache()
                m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = torch.ones(batch, 1, dtype=torch.long, device="cuda")

                def step(nxt=nxt, cache=cache, keep=context - 1):
                    m(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache.crop(keep)  # the same context every step

                out[key] = median_ms(step, reps)
                del cache, ids
            except (RuntimeError, TypeError, ValueError, AttributeError) as e:
                out[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"HF {key}: {out[key + '_error']}", flush=True)
            torch.cuda.empty_cache()
    return out


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_step.py needs a CUDA device")
    cases = [(int(b), int(c)) for b in args.batches.split(",") for c in args.contexts.split(",")]
    copies = [copy_gbps()]
    print(f"copy reference: {copies[0]:.1f} GB/s (read + write)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / args.shape)
        if not (model_dir / "config.json").is_file():
            write_random_model(model_dir, args.shape, dtype="bfloat16", device="cuda")
        rows, prefill = run_ours(args, model_dir, cases)  # floor_ms: below, after the steps
        torch.cuda.empty_cache()
        copies.append(copy_gbps())
        gbps = max(copies)
        print(f"copy reference after the steps: {copies[1]:.1f} GB/s; floor at {gbps:.1f}",
              flush=True)
        for r in rows:
            r["floor_ms"] = r["weight_nbytes"] / gbps / 1e6
        hf = {} if args.skip_hf else run_hf(model_dir, cases, max(5, args.reps // 4))
    for r in rows:
        r["hf_eager_ms"] = hf.get(f"{r['batch']}x{r['context']}")
        if r["hf_eager_ms"] is None and not args.skip_hf:
            r["hf_error"] = hf.get(f"{r['batch']}x{r['context']}_error")
        best = r.get("graph_gpu_ms", r["eager_wall_ms"])
        r["graph_gpu_over_floor"] = best / r["floor_ms"]
        if r["hf_eager_ms"]:
            r["hf_over_graph_wall"] = r["hf_eager_ms"] / r.get("graph_wall_ms",
                                                              r["eager_wall_ms"])
    print(f"{'batch':>5} {'ctx':>6} {'floor':>7} {'graph gpu':>9} {'graph wall':>10} "
          f"{'eager':>7} {'HF':>7}  (ms)")
    for r in rows:
        f = [r.get(k) for k in ("floor_ms", "graph_gpu_ms", "graph_wall_ms", "eager_wall_ms",
                                "hf_eager_ms")]
        print(f"{r['batch']:5d} {r['context']:6d} " + " ".join(
            f"{x:9.3f}" if x is not None else f"{'n/a':>9}" for x in f))
    result: dict[str, Any] = {
        "bench": "decode_step", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "kernels_built": cuda_ops.load() is not None, "shape": args.shape,
        "copy_GBps": gbps, "copy_GBps_before_after": copies, "args": vars(args),
        "rows": rows, "prefill": prefill,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
