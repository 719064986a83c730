"""Offline throughput: nanopd's `LLM.generate` against HF transformers `generate`.

The workload is nano-vllm's: N sequences of random token ids (uniform in [0, 10000), clipped
to the vocabulary), prompt and output lengths uniform in [100, 1024], `ignore_eos`. Both
sides run the same random-weight model folder on the same device and dtype. HF runs the
first --hf-num-seqs sequences in left-padded batches and must generate every batch to its
longest output; only each sequence's own output length counts as useful tokens.

    python bench/offline_throughput.py                        # GPU, qwen3-0.6b, 256 seqs
    python bench/offline_throughput.py --quick --device cpu   # tiny model, minutes on CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from services.worker.engine import LLM, SamplingParams  # noqa: E402
from services.worker.models.random_model import SHAPES, write_random_model  # noqa: E402
from services.worker.ops import cuda_ops  # noqa: E402
from services.worker.ops.flash import active_route  # noqa: E402

T = TypeVar("T")
TOKEN_ID_HIGH = 10000
QUICK = {"shape": "tiny-qwen3", "num_seqs": 16, "min_input": 16, "max_input": 64,
         "min_output": 16, "max_output": 64}
FULL = {"shape": "qwen3-0.6b", "num_seqs": 256, "min_input": 100, "max_input": 1024,
        "min_output": 100, "max_output": 1024}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="random model shape (qwen3-0.6b)")
    p.add_argument("--model", help="existing HF model folder (instead of a random one)")
    p.add_argument("--model-dir", help="where to keep the random model (reused if present)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="bfloat16 on GPU, float32 on CPU")
    p.add_argument("--num-seqs", type=int)
    p.add_argument("--min-input", type=int)
    p.add_argument("--max-input", type=int)
    p.add_argument("--min-output", type=int)
    p.add_argument("--max-output", type=int)
    p.add_argument("--temperature", type=float, default=0.6, help="nanopd side; HF is greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="CPU-sized: tiny-qwen3, 16 short seqs")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--hf-num-seqs", type=int, help="sequences HF runs (all in --quick, else 64)")
    p.add_argument("--hf-batch-size", type=int, help="HF batch size (all in --quick, else 16)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="build the workload, print it, exit")
    p.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    on_gpu = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.hf_num_seqs is None:
        args.hf_num_seqs = args.num_seqs if args.quick else min(64, args.num_seqs)
    args.hf_num_seqs = min(args.hf_num_seqs, args.num_seqs)
    args.hf_batch_size = min(args.hf_batch_size or (args.hf_num_seqs if args.quick else 16),
                             args.hf_num_seqs)
    if not (1 <= args.min_input <= args.max_input and 1 <= args.min_output <= args.max_output):
        p.error("need 1 <= --min-input <= --max-input and 1 <= --min-output <= --max-output")
    if args.num_seqs < 1 or args.hf_num_seqs < 1 or args.hf_batch_size < 1:
        p.error("--num-seqs, --hf-num-seqs and --hf-batch-size must be >= 1")
    return args


def build_workload(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    high = min(TOKEN_ID_HIGH, vocab_size)
    prompts: list[list[int]] = []
    outputs: list[int] = []
    for _ in range(args.num_seqs):
        n = rng.randint(args.min_input, args.max_input)
        prompts.append([rng.randrange(high) for _ in range(n)])
        outputs.append(rng.randint(args.min_output, args.max_output))
    return {"prompts": prompts, "output_lens": outputs, "token_id_high": high}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[..., T], device: torch.device, *fn_args: Any) -> tuple[T, float]:
    sync(device)
    t0 = time.perf_counter()
    result = fn(*fn_args)
    sync(device)
    return result, time.perf_counter() - t0


def free_device_memory(device: torch.device) -> float | None:
    """Collect garbage; return the GiB still allocated on a CUDA device."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**30


def prepare_model(args: argparse.Namespace, tmp: str) -> Path:
    if args.model:
        return Path(args.model)
    path = Path(args.model_dir) if args.model_dir else Path(tmp) / args.shape
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        want = SHAPES[args.shape]
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        if any(cfg.get(k) != want[k] for k in keys) or cfg.get("architectures") != [
            want["architecture"]
        ]:
            raise SystemExit(f"{path} holds another model than shape {args.shape}; remove it")
        print(f"reusing model folder {path}", file=sys.stderr)
        return path
    print(f"writing random {args.shape} ({args.dtype}) to {path} ...", file=sys.stderr)
    gen_device = args.device if torch.device(args.device).type == "cuda" else "cpu"
    return write_random_model(path, args.shape, dtype=args.dtype, seed=args.seed,
                              device=gen_device)


def run_nanopd(args: argparse.Namespace, model: Path, wl: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # initializes CUDA (a reused --model-dir did not)
        torch.cuda.reset_peak_memory_stats(device)
    engine_kwargs: dict[str, Any] = {
        "dtype": args.dtype, "block_size": 16, "max_num_batched_tokens":
        args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
        "enable_prefix_caching": True, "num_kv_blocks": args.num_kv_blocks,
        "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed,
    }
    llm, load_s = timed(lambda: LLM(model=str(model), device=args.device, **engine_kwargs),
                        device)
    warm_rng = random.Random(args.seed + 1)
    warm = [[warm_rng.randrange(wl["token_id_high"]) for _ in range(24)] for _ in range(2)]
    llm.generate(warm, SamplingParams(temperature=args.temperature, max_tokens=8,
                                      ignore_eos=True))
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True)
              for n in wl["output_lens"]]
    outs, secs = timed(llm.generate, device, wl["prompts"], params)
    got = [len(o.token_ids) for o in outs]
    n_out, n_in = sum(wl["output_lens"]), sum(len(p) for p in wl["prompts"])
    result = {
        "seconds": secs, "load_seconds": load_s, "num_seqs": len(outs),
        "prompt_tokens": n_in, "output_tokens": sum(got),
        "output_tokens_per_s": n_out / secs, "total_tokens_per_s": (n_in + n_out) / secs,
        "all_output_lengths_ok": got == wl["output_lens"],
        "engine_config": {k: v for k, v in engine_kwargs.items() if k != "seed"},
        "num_kv_blocks_used": llm.engine.runner.num_blocks,
        "attention_route": active_route() if device.type == "cuda" else "torch",
        "decode_kernel": device.type == "cuda" and cuda_ops.load() is not None
        and os.environ.get("NANOPD_ATTN", "auto") in ("auto", "cuda"),
        "stats": llm.engine.stats(),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del llm, outs
    result["memory_left_after_free_gib"] = free_device_memory(device)
    return result


def _hf_load(model: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
    except TypeError:  # older transformers
        m = AutoModelForCausalLM.from_pretrained(str(model), torch_dtype=dtype)
    if m.dtype != dtype:  # an older transformers may ignore an unknown `dtype=`
        m = m.to(dtype)
    return m.to(device).eval()


def _hf_batch(m: Any, prompts: list[list[int]], new_tokens: int, pad_id: int,
              device: torch.device) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = m.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=pad_id)
    return out[:, width:]


def run_hf(args: argparse.Namespace, model: Path, wl: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    m, load_s = timed(lambda: _hf_load(model, dtype, device), device)
    cfg = m.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    warm_rng = random.Random(args.seed + 2)
    warm = [[warm_rng.randrange(wl["token_id_high"]) for _ in range(n)] for n in (20, 24)]
    _hf_batch(m, warm, 8, pad_id, device)
    n, bs = args.hf_num_seqs, args.hf_batch_size
    prompts, lens = wl["prompts"][:n], wl["output_lens"][:n]
    batches = [(prompts[i:i + bs], lens[i:i + bs]) for i in range(0, n, bs)]

    def run_all(m: Any) -> tuple[int, int]:
        raw = padded_in = 0
        for bp, bl in batches:
            gen = _hf_batch(m, bp, max(bl), pad_id, device)
            raw += gen.numel()
            padded_in += len(bp) * max(len(p) for p in bp)
            if gen.shape[1] < max(bl):
                raise RuntimeError(f"HF stopped early: {gen.shape[1]} < {max(bl)} tokens")
        return raw, padded_in

    (raw, padded_in), secs = timed(run_all, device, m)
    useful = sum(lens)
    result = {
        "seconds": secs, "load_seconds": load_s, "num_seqs": n, "batch_size": bs,
        "num_batches": len(batches),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "prompt_tokens": sum(len(p) for p in prompts), "padded_prompt_tokens": padded_in,
        "useful_output_tokens": useful, "generated_tokens": raw,
        "useful_tokens_per_s": useful / secs, "raw_tokens_per_s": raw / secs,
        "padding_waste": 1 - useful / raw,
    }
    del m
    free_device_memory(device)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nanopd-bench-") as tmp:
        if args.model:
            vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        else:
            vocab = SHAPES[args.shape]["vocab_size"]
        wl = build_workload(args, vocab)
        workload = {
            "num_seqs": args.num_seqs, "seed": args.seed, "temperature": args.temperature,
            "ignore_eos": True, "input_len": [args.min_input, args.max_input],
            "output_len": [args.min_output, args.max_output],
            "token_id_range": [0, wl["token_id_high"]],
            "prompt_tokens": sum(len(p) for p in wl["prompts"]),
            "output_tokens": sum(wl["output_lens"]),
        }
        if args.dry_run:
            print(json.dumps({"args": vars(args), "workload": workload}, indent=2))
            return 0
        model = prepare_model(args, tmp)
        print(f"nanopd: {args.num_seqs} seqs on {args.device} ({args.dtype}) ...",
              file=sys.stderr)
        nano = run_nanopd(args, model, wl)
        hf = None
        if not args.skip_hf:
            print(f"hf: {args.hf_num_seqs} seqs, batch {args.hf_batch_size} ...", file=sys.stderr)
            hf = run_hf(args, model, wl)
    ratio = nano["output_tokens_per_s"] / hf["useful_tokens_per_s"] if hf else None
    result = {
        "bench": "offline_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "device_name": device_name(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
        "shape": None if args.model else args.shape, "model": args.model,
        "dtype": args.dtype, "workload": workload, "nanopd": nano, "hf": hf,
        "ratio_vs_hf": ratio,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    summary = (f"nanopd: {nano['output_tokens']} tokens in {nano['seconds']:.2f} s = "
               f"{nano['output_tokens_per_s']:.1f} tok/s (attention {nano['attention_route']}, "
               f"decode kernel {nano['decode_kernel']})")
    if hf:
        summary += (f"\nhf: {hf['useful_output_tokens']} useful ({hf['generated_tokens']} raw) "
                    f"in {hf['seconds']:.2f} s = {hf['useful_tokens_per_s']:.1f} useful tok/s, "
                    f"{hf['raw_tokens_per_s']:.1f} raw tok/s\nratio nanopd/hf: {ratio:.2f}x")
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
