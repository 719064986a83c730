"""Make the git-ignored folder .fi/ that bench/flashinfer_decode.py carries to the GPU machine.

FlashInfer is not on the GPU machine, which has no network, and the package is ~430 MB. Run
here, on the development machine (package registry, nvcc 13, gcc, ninja, no GPU needed):

    .venv/bin/python bench/make_fi.py            # then carry ".fi" in the device call

It downloads flashinfer-python 0.7.2.post1, apache-tvm-ffi 0.1.15.post2 (cp312 for the GPU
machine, this Python's for the build) and nvidia-ml-py; builds, for sm_90a, the modules the
benchmark calls (bf16, head dims 128 and 64): the CUDA-core batch decode
(`use_tensor_cores=False`) and the fa2 prefill kernels that FlashInfer's tensor-core decode
runs (`use_tensor_cores=True`: its primary and its paged module); and assembles .fi/ with
  flashinfer/  the package without its JIT sources (but for the batch_decode* and
               batch_prefill* templates and sources in data/csrc/, which its module
               generators read even for a prebuilt module) and the subpackages nothing
               imports; the built modules under data/aot/ (where FlashInfer looks for them)
  wheels/      tvm_ffi for cp312 and nvidia-ml-py (flashinfer_decode.py pip-installs them
               into /tmp there)
  stubs/       an empty libcuda.so (soname libcuda.so.1) for a JIT link, should one happen
  README.txt   what was done
The build takes a few minutes on 2 cores; the folder is ~40 MB (the device carries 64 MiB
with the working tree).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLASHINFER = "flashinfer-python==0.7.2.post1"
TVM_FFI = "apache-tvm-ffi==0.1.15.post2"
PYNVML = "nvidia-ml-py"
HEAVY = ("experimental", "fused_moe", "moe_ep")  # subpackages trimmed to what is imported
KEEP_CSRC = ("batch_decode", "batch_prefill")  # data/csrc/ files kept (top level only)
BUILD = r'''
import os, sys
sys.path[:0] = [os.environ["FI_SITE"], os.environ["FI_PKG"]]
BUILD = os.environ.get("FI_CHECK") is None
import torch
from flashinfer.jit.attention.modules import (
    _gen_batch_prefill_independent_paged_module, _gen_batch_prefill_primary_module,
    gen_batch_decode_module)
bf = torch.bfloat16
for hd in (128, 64):
    specs = [gen_batch_decode_module(bf, bf, bf, torch.int32, hd, hd, 0, False, False)]
    specs += [gen("fa2", bf, bf, bf, torch.int32, hd, hd, 0, False, False, False)
              for gen in (_gen_batch_prefill_primary_module,
                          _gen_batch_prefill_independent_paged_module)]
    for spec in specs:
        if BUILD:
            spec.build(verbose=False)
            print(spec.name, spec.jit_library_path, flush=True)
        else:  # the check in .fi/: the generator reads its templates, finds the module
            assert spec.is_aot, spec.name
            print("AOT", spec.name, flush=True)
if not BUILD:
    sys.exit(0)
import flashinfer, flashinfer.decode, flashinfer.prefill  # what the benchmark imports
print("IMPORTED", *sorted({m.__file__ for m in list(sys.modules.values())
                           if getattr(m, "__file__", None)
                           and m.__name__.startswith("flashinfer")}), sep="\n")
'''


def pip_download(work: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                    str(work / "dl"), *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/nanopd_make_fi", help="download and build folder")
    p.add_argument("--out", default=str(ROOT / ".fi"), help="the folder to make")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    (work / "dl").mkdir(parents=True)
    pip_download(work, FLASHINFER, PYNVML)
    platforms = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    here = f"{sys.version_info.major}{sys.version_info.minor}"
    for py in sorted({"312", here}):
        pip_download(work, "--only-binary", ":all:", "--python-version", py,
                     "--implementation", "cp", "--abi", f"cp{py}", *platforms, TVM_FFI)
    dl = sorted((work / "dl").iterdir())
    [fi_wheel] = [w for w in dl if w.name.startswith("flashinfer_python")]
    with zipfile.ZipFile(fi_wheel) as z:
        z.extractall(work / "pkg")
    site = work / "site"
    build_wheels = [w for w in dl if w.name.startswith("nvidia_ml_py")
                    or f"cp{here}-cp{here}" in w.name]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), *map(str, build_wheels)], check=True)
    stubs = work / "stubs"
    stubs.mkdir()
    subprocess.run(["gcc", "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(stubs / "libcuda.so"),
                    "-x", "c", "/dev/null"], check=True)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")  # nvcc, lib64/libcudart
    if not (Path(cuda_home) / "lib64").is_dir():
        sys.exit(f"no CUDA toolkit at {cuda_home} (lib64/ missing): set CUDA_HOME")
    env = {**os.environ, "FI_SITE": str(site), "FI_PKG": str(work / "pkg"),
           "FLASHINFER_CUDA_ARCH_LIST": "9.0a", "FLASHINFER_WORKSPACE_BASE": str(work / "ws"),
           "FLASHINFER_EXTRA_LDFLAGS": f"-L{stubs}", "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",
           "CUDA_HOME": cuda_home,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-c", BUILD], env=env, check=True, text=True,
                          stdout=subprocess.PIPE).stdout.splitlines()  # stderr: the build's
    cut = done.index("IMPORTED")
    built = [line.split() for line in done[:cut]]
    imported = {Path(f).resolve() for f in done[cut + 1:]}

    shutil.rmtree(out, ignore_errors=True)
    package = work / "pkg" / "flashinfer"
    for sub in HEAVY:  # keep what importing flashinfer loads, and every package's __init__
        for f in (package / sub).rglob("*"):
            if f.is_file() and f.resolve() not in imported and f.name != "__init__.py":
                f.unlink()
    # what the module generators read even when a module is prebuilt: its config and kernel
    # templates and the sources they copy into the generated folder
    templates = work / "templates"
    shutil.copytree(package / "data" / "csrc", templates,
                    ignore=lambda d, names: [n for n in names if not n.startswith(KEEP_CSRC)])
    for f in package.rglob("*.cu"):
        f.unlink()
    shutil.rmtree(package / "data")
    shutil.copytree(templates, package / "data" / "csrc")
    for name, so in built:
        dest = package / "data" / "aot" / name
        dest.mkdir(parents=True)
        shutil.copy2(so, dest / f"{name}.so")
    shutil.copytree(package, out / "flashinfer", ignore=shutil.ignore_patterns("__pycache__"))
    (out / "wheels").mkdir()
    for w in dl:
        if w.name.startswith("nvidia_ml_py") or "cp312-cp312" in w.name:
            shutil.copy2(w, out / "wheels" / w.name)
    shutil.copytree(stubs, out / "stubs")
    (out / "README.txt").write_text(textwrap.dedent(f"""\
        Made by bench/make_fi.py from {FLASHINFER}, {TVM_FFI} (cp312) and {PYNVML}.
        flashinfer/: the package without its .cu sources and data/ (JIT sources, CUTLASS)
        but for data/csrc/{KEEP_CSRC[0]}* and {KEEP_CSRC[1]}* (what the generators read),
        and without the files of {", ".join(HEAVY)} that `import flashinfer` does not load;
        data/aot/ holds these modules, built for sm_90a with nvcc ({cuda_home}):
        """) + "".join(f"  {name}\n" for name, _ in built))
    # in .fi/ itself: imports, and each module's generator finds its templates and the module
    check = {**env, "FI_PKG": str(out), "FI_CHECK": "1"}
    found = subprocess.run([sys.executable, "-c", BUILD], env=check, check=True, text=True,
                           stdout=subprocess.PIPE).stdout.split()
    assert found.count("AOT") == len(built), found
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB, {len(built)} modules built")


if __name__ == "__main__":
    main()
