"""FlashInfer's batch decode over a paged KV cache, on bench/kernels.py's shapes and timing.

FlashInfer is not on the GPU machine: a trimmed flashinfer-python 0.7.2.post1 travels in the
ignored folder .fi/ (carry `.fi`; `bench/make_fi.py` makes it on the development machine),
with its batch-decode and fa2 prefill modules prebuilt for sm_90a (bf16, head dim 128 and
64) and the apache-tvm-ffi cp312 and nvidia-ml-py wheels that it imports (installed here into
/tmp/nanopd_fi_site when `import tvm_ffi` fails); .fi/README.txt says what was trimmed. No
PYTHONPATH needed. From the repo root on the GPU machine:

    PYTHONUNBUFFERED=1 timeout 300 python3 bench/flashinfer_decode.py --out $OUT/flashinfer.json

For each head dim x batch x context: the cache of bench/kernels.py's make_case (blocks
scattered at random, NHD); BatchDecodeWithPagedKVCacheWrapper(backend="fa2") planned outside
the timed region; run() timed by kernels.Timer (median of --reps after --warmup, L2 flushed);
its output (poisoned first) checked against torch SDPA (enable_gqa) on contiguous K/V of the
same data, and SDPA timed too. GB/s counts K/V bytes read + q + out, as bench/kernels.py does.
host_enqueue_s is one run() call's host time while the GPU is busy: where it exceeds the
Timer's sleep before each call (about 50 us), host overhead leaks into the timed region.
--tensor-cores adds FlashInfer's tensor-core decode (its fa2 prefill kernels, prebuilt in
.fi/ by make_fi.py, else JIT-built there), after all the plain decode rows are saved.

It never fails the device step (bench/guarded.py): the measuring runs in a child process under
--timeout-s (older FlashInfer builds died of SIGSEGV there), the JSON is rewritten after every
stage and row, and how the child ended is recorded in it; the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import inspect
import itertools
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from guarded import Progress, run_guarded, short_error  # bench/: this script's folder

ROOT = Path(__file__).resolve().parent.parent
FI_DIR = ROOT / ".fi"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32,64,128", help="batch sizes, comma-separated")
    p.add_argument("--contexts", default="512,2048,8192", help="context lengths, comma-separated")
    p.add_argument("--head-dims", default="128,64", help="head dims, comma-separated")
    p.add_argument("--num-heads", type=int, default=12, help="query heads")
    p.add_argument("--num-kv-heads", type=int, default=2, help="KV heads")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (page size)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="dtype")
    p.add_argument("--ref-nbytes", type=int, default=2**30, help="bytes of the copy reference")
    p.add_argument("--flush", choices=("write", "read"), default="write",
                   help="how the L2 is flushed before each timed call (bench/kernels.py)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--reps", type=int, default=30, help="timed calls; the median is reported")
    p.add_argument("--workspace-mb", type=int, default=128, help="FlashInfer float workspace")
    p.add_argument("--tensor-cores", action="store_true",
                   help="also time use_tensor_cores=True (fa2 prefill kernels)")
    p.add_argument("--fi-dir", default=str(FI_DIR), help="the trimmed FlashInfer folder")
    p.add_argument("--timeout-s", type=float, default=270.0,
                   help="the measuring child is killed after this long")
    p.add_argument("--out", default="flashinfer_decode.json", help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def supervise(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *sys.argv[1:]]
    result = run_guarded(cmd, out, args.timeout_s, "flashinfer_decode")
    timed = sum(1 for r in result.get("rows", []) if "flashinfer_s" in r)
    print(f"flashinfer_decode: {result['status']}, {timed} rows timed, child rc "
          f"{result['child']['rc']}{' (timed out)' if result['child']['timed_out'] else ''}; "
          f"{result.get('error', '')}; wrote {out}")


# ---------------------------------------------------------------- worker


def load_kernels_module():
    """bench/kernels.py (make_case, Timer, copy_reference), loaded by path: bench/ is no package."""
    spec = importlib.util.spec_from_file_location("nanopd_bench_kernels", ROOT / "bench" /
                                                  "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_cuda(torch) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")


def import_tvm_ffi(fi_dir: Path) -> str:
    """tvm_ffi from the carried wheel (pip --target into /tmp) unless it is already there."""
    import torch
    # Without torch's C DLPack API tvm_ffi would try to compile an addon: skip that.
    if not (hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
            or hasattr(torch.Tensor, "__c_dlpack_exchange_api__")):
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    try:
        import tvm_ffi
    except ImportError:
        wheels = sorted(str(w) for w in (fi_dir / "wheels").glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"no tvm_ffi and no wheels in {fi_dir / 'wheels'}") from None
        site = Path("/tmp/nanopd_fi_site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                        *wheels], check=True, timeout=120)
        sys.path.insert(0, str(site))
        import tvm_ffi
    return f"{tvm_ffi.__version__} from {Path(tvm_ffi.__file__).parent}"


def ensure_cudart() -> str:
    """The prebuilt modules need libcudart.so.13 (DT_NEEDED, no rpath): the one torch loaded."""
    def loaded() -> list[str]:
        maps = Path("/proc/self/maps").read_text()
        return sorted({ln.split()[-1] for ln in maps.splitlines() if "libcudart.so" in ln})

    if not loaded():
        import torch
        for cand in ["libcudart.so.13", *map(str, Path(torch.__file__).parents[1].glob(
                "nvidia/*/lib/libcudart.so.13")), "/usr/local/cuda/lib64/libcudart.so.13"]:
            try:
                ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
    return ", ".join(loaded()) or "none loaded"


def import_flashinfer(fi_dir: Path):
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/nanopd_flashinfer")
    # A JIT fallback links -lcuda: give it a stub in case the toolkit has none.
    stubs = fi_dir / "stubs"
    os.environ.setdefault("FLASHINFER_EXTRA_LDFLAGS", f"-L{stubs}")
    # ninja and nvcc for a JIT build: this python's bin folder first
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    sys.path.insert(0, str(fi_dir))
    import flashinfer
    from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
    return flashinfer, BatchDecodeWithPagedKVCacheWrapper


def module_source(torch, head_dim: int, dtype) -> str:
    """Where the decode module for these types comes from: the carried .so or a JIT build."""
    from flashinfer.jit.attention.modules import gen_batch_decode_module
    spec = gen_batch_decode_module(dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0,
                                   False, False)
    if spec.is_aot:
        return f"prebuilt {spec.aot_path.name}"
    return f"JIT build in {spec.build_dir}"


def bench_row(kernels, timer, wrapper, args, head_dim: int, batch: int,
              context: int, copy_gbps: float) -> dict:
    import torch
    import torch.nn.functional as F
    case_args = argparse.Namespace(**{**vars(args), "head_dim": head_dim})
    q, k_cache, v_cache, tables, _, _ = kernels.make_case(case_args, batch, context)
    bs = args.block_size
    blocks_per_seq = tables.shape[1]
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * blocks_per_seq
    last_page_len = torch.full((batch,), context - (blocks_per_seq - 1) * bs,
                               dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    t0 = time.perf_counter()
    wrapper.plan(indptr, tables.flatten(), last_page_len, args.num_heads, args.num_kv_heads,
                 head_dim, bs, pos_encoding_mode="NONE", q_data_type=q.dtype,
                 kv_data_type=k_cache.dtype, sm_scale=scale)
    torch.cuda.synchronize()
    plan_s = time.perf_counter() - t0
    out = torch.empty_like(q)
    out.fill_(float("nan"))  # poisoned: a row it does not write shows as a difference

    def fi():
        return wrapper.run(q, (k_cache, v_cache), out=out)

    fi()
    # sdpa on contiguous K/V of the same data: [batch, kv_heads, context, head_dim]
    k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    q4 = q[:, :, None, :]
    ref = F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)[:, :, 0]
    diff = float((out.float() - ref.float()).abs().max())
    t_fi = timer.median_s(fi)
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time: the calls below only enqueue
    host_s = []
    for _ in range(10):
        t0 = time.perf_counter()
        fi()
        host_s.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    nbytes = 2 * batch * context * args.num_kv_heads * head_dim * q.element_size() + 2 * q.nbytes
    row = {
        "head_dim": head_dim, "batch": batch, "context": context, "nbytes": nbytes,
        "plan_s": plan_s, "host_enqueue_s": statistics.median(host_s),
        "flashinfer_s": t_fi, "flashinfer_GBps": nbytes / t_fi / 1e9,
        "flashinfer_frac_of_copy": nbytes / t_fi / 1e9 / copy_gbps,
        "max_abs_diff_vs_sdpa": diff, "check": diff < 2e-2,
    }
    row["sdpa_s"] = timer.try_median_s(
        lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    if isinstance(row["sdpa_s"], float):
        row["sdpa_over_flashinfer"] = row["sdpa_s"] / t_fi
    return row


VARIANTS = {  # name: BatchDecodeWithPagedKVCacheWrapper keyword arguments
    "decode": {"backend": "fa2"},  # the CUDA-core decode kernel: the carried .so
    "tensor-cores": {"backend": "fa2", "use_tensor_cores": True},  # fa2 prefill kernels
}


def setup(run: Progress, args: argparse.Namespace) -> dict:
    import torch
    r, fi_dir = run.result, Path(args.fi_dir).resolve()
    r["torch"] = torch.__version__
    run.stage("cuda", require_cuda, torch)
    r["device"] = torch.cuda.get_device_name()
    kernels = load_kernels_module()
    r["timer_sleeps_before_call"] = "_sleep" in inspect.getsource(kernels.Timer.median_s)
    torch.zeros(1, device="cuda")  # CUDA initialised: torch's libcudart is loaded
    r["cudart"] = ensure_cudart()
    r["tvm_ffi"] = run.stage("import tvm_ffi", import_tvm_ffi, fi_dir)
    flashinfer, wrapper_cls = run.stage("import flashinfer", import_flashinfer, fi_dir)
    r["flashinfer"] = f"{flashinfer.__version__} from {Path(flashinfer.__file__).parent}"
    dtype = getattr(torch, args.dtype)
    r["decode_modules"] = {d: module_source(torch, int(d), dtype)
                           for d in args.head_dims.split(",")}
    timer = kernels.Timer(args.warmup, args.reps, args.flush)
    r["copy_reference"] = run.stage("copy reference", kernels.copy_reference, args, timer)
    r["enable_pdl"] = flashinfer.utils.device_support_pdl(torch.device("cuda"))
    return {"kernels": kernels, "timer": timer, "wrapper_cls": wrapper_cls}


def run_variant(run: Progress, args: argparse.Namespace, env: dict, variant: str) -> None:
    import torch
    workspace = torch.zeros(args.workspace_mb * 2**20, dtype=torch.uint8, device="cuda")
    try:
        wrapper = run.stage(f"wrapper {variant}", lambda: env["wrapper_cls"](
            workspace, "NHD", **VARIANTS[variant]))
    except Exception:
        return
    copy_gbps = run.result["copy_reference"]["GBps"]
    shapes = list(itertools.product([int(b) for b in args.batches.split(",")],
                                    [int(c) for c in args.contexts.split(",")]))
    for head_dim in [int(d) for d in args.head_dims.split(",")]:
        for batch, context in shapes:
            run.result["stage"] = f"{variant} hd{head_dim} b{batch} c{context}"
            run.save()
            head = f"{variant:>12} {head_dim:4d} {batch:5d} {context:6d}"
            try:
                row = bench_row(env["kernels"], env["timer"], wrapper, args, head_dim,
                                batch, context, copy_gbps)
            except Exception as e:
                row = {"head_dim": head_dim, "batch": batch, "context": context,
                       "error": short_error(e)}
                print(f"{head} failed: {row['error']}")
                if not any(x.get("variant") == variant and x["head_dim"] == head_dim
                           for x in run.result["rows"]):  # its module may not build
                    row["error"] += " (first row of this head dim: the rest skipped)"
                    run.result["rows"].append({"variant": variant, **row})
                    run.save()
                    break
            else:
                sdpa = row["sdpa_s"]
                print(f"{head} {row['flashinfer_s'] * 1e6:9.1f} {row['flashinfer_GBps']:7.1f}"
                      f" {row['flashinfer_frac_of_copy']:7.2f}"
                      f" {sdpa * 1e6 if isinstance(sdpa, float) else float('nan'):9.1f}"
                      f" {row['host_enqueue_s'] * 1e6:7.1f}"
                      f" {row['max_abs_diff_vs_sdpa']:8.4f}"
                      f"{'' if row['check'] else '  CHECK FAILED'}")
            run.result["rows"].append({"variant": variant, **row})
            run.save()
            torch.cuda.empty_cache()


def work(args: argparse.Namespace) -> None:
    run = Progress(Path(args.out), "flashinfer_decode",
                   {k: v for k, v in vars(args).items() if k not in ("out", "worker")})
    r = run.result
    try:
        env = setup(run, args)
    except BaseException:  # recorded by run.stage, or the import of torch itself failed
        r.setdefault("error", traceback.format_exc()[-600:])
        r["status"] = "failed"
        run.save()
        return
    print(f"copy reference: {r['copy_reference']['GBps']:.1f} GB/s; "
          f"decode modules: {r['decode_modules']}")
    print(f"{'variant':>12} {'hd':>4} {'batch':>5} {'ctx':>6} {'fi us':>9} {'GB/s':>7} "
          f"{'of copy':>7} {'sdpa us':>9} {'host us':>7} {'diff':>8}")
    variants = ["decode"] + (["tensor-cores"] if args.tensor_cores else [])
    for variant in variants:  # decode first: its rows are saved before any JIT build
        run_variant(run, args, env, variant)
    timed = [x for x in r["rows"] if "flashinfer_s" in x]
    expected = len(variants) * len(args.head_dims.split(",")) * len(
        args.batches.split(",")) * len(args.contexts.split(","))
    differ = sum(1 for x in timed if not x["check"])
    if len(timed) == expected and not differ:
        r["status"] = "ok"
        r.pop("error", None)
    else:
        r["status"] = "partial" if timed else "failed"
        first = next((x["error"] for x in r["rows"] if "error" in x), r.get("error"))
        r["error"] = (f"{len(timed)}/{expected} rows timed, {differ} differ from sdpa by 2e-2 "
                      f"or more; first error: {first}")
    r["stage"] = "done"
    run.save()


def main() -> None:
    args = parse_args()
    if args.worker:
        work(args)
    else:
        supervise(args)


if __name__ == "__main__":
    main()
