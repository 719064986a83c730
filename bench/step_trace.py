"""One decode step's CUDA graph, replayed for a profiler: where in the step the DRAM idles.

Builds the step as bench/decode_profile.py does (a real model shape, random weights, every
kernel of csrc/, the engine's CUDA graph), replays it until warm, then:
- writes every kernel's span in one replay (torch.profiler: start and end in us from the
  replay's first kernel, name) to --spans, so a sampled timeline can be read against them;
- replays it --replays more times between cudaProfilerStart and cudaProfilerStop, for a
  profiler started with its capture off, e.g. Nsight Compute's PM sampling over the whole
  graph (DRAM throughput every few hundred cycles across the step):

    ncu --profile-from-start off --graph-profiling graph --section PmSampling \\
        -o step python3 bench/step_trace.py --spans spans.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain copy of the repo, no install
    sys.path.insert(0, str(ROOT))

from bench.decode_profile import decode_engine  # noqa: E402


def replay_spans(replay) -> list[dict]:
    """Kernel spans of one call of replay, in us from its first kernel's start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    spans = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                   if ev.device_type == torch.autograd.DeviceType.CUDA)
    t0 = spans[0][0] if spans else 0
    return [{"start_us": s - t0, "end_us": e - t0, "name": n[:120]} for s, e, n in spans]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--replays", type=int, default=1, help="replays inside the capture range")
    p.add_argument("--spans", help="write one replay's kernel spans here (JSON)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm, spec = decode_engine(Path(tmp), args.shape, args.batch, args.context)
        runner = llm.engine.runner
        if runner.graphs is None:  # the engine logged why (e.g. the kernels are not built)
            raise SystemExit("step_trace: this engine runs decode steps without CUDA graphs; "
                             "build the kernels (make kernels) on a GPU")
        runner.run(spec, list(range(args.batch)))  # captures the graphs, fills the inputs
        graph = runner.graphs.graphs[runner.graphs.padded_size(args.batch)]
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        if args.spans:
            spans = replay_spans(graph.replay)
            Path(args.spans).write_text(json.dumps({
                "shape": args.shape, "batch": args.batch, "context": args.context,
                "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "spans": spans}, indent=1))
            print(f"{len(spans)} kernels, {spans[-1]['end_us']:.1f} us" if spans else "none")
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
