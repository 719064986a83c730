"""Bytes of SASS of each kernel in csrc/ (no GPU needed): nvcc -arch=sm_90 -O3 -c, then
cuobjdump -sass, one function's size being its last instruction's offset + 16.

A decode step runs five kernels a layer on every SM; these sizes say how much code each
kernel brings (bench/results/README.md, tenth to twelfth rounds: 13% less SASS in
paged_decode and 11% less in gate_up left the step's time level). cuobjdump and nvdisasm
come with the CUDA toolkit, or from the wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
(their nvidia/cu13/bin); -D passes defines, as csrc/build.py --variant does.

    python3 bench/sass_sizes.py [--filter paged_decode] [-D NANOPD_DECODE_STAGES=4] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["paged_decode.cu", "gemv.cu", "gemv_fused.cu", "fused.cu", "kv_store.cu",
           "kv_copy.cu"]


def tool(name: str) -> str:
    """The path of a CUDA binary tool: on PATH, else in the pip wheel's nvidia/cu13/bin."""
    found = shutil.which(name)
    if found:
        return found
    wheel_bin = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin" / name
    if wheel_bin.is_file():
        return str(wheel_bin)
    sys.exit(f"{name} not found: install the CUDA toolkit or `pip install nvidia-cuda-{name}`"
             + (" nvidia-cuda-nvdisasm" if name == "cuobjdump" else ""))


def sizes(obj: Path, cuobjdump: str, env: dict[str, str]) -> dict[str, int]:
    """{mangled function name: bytes of SASS} of one object file."""
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                          env=env, check=True).stdout
    out: dict[str, int] = {}
    name = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"/\*([0-9a-f]{4,6})\*/", line)
        if m and name:
            out[name] = int(m.group(1), 16) + 16
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter", default="", help="only functions whose name contains this")
    p.add_argument("-D", dest="defines", action="append", default=[], help="NAME=VALUE")
    p.add_argument("--out", help="also write the sizes here as JSON")
    args = p.parse_args()
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    env = dict(os.environ)
    env["PATH"] = str(Path(tool("nvdisasm")).parent) + os.pathsep + env.get("PATH", "")
    result: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            obj = Path(tmp) / (src + ".o")
            subprocess.run([nvcc, "-arch=sm_90", "-O3", "-std=c++17", "-c",
                            str(ROOT / "csrc" / src), "-o", str(obj)]
                           + [f"-D{d}" for d in args.defines], check=True)
            result[src] = {n: b for n, b in sizes(obj, cuobjdump, env).items()
                           if args.filter in n}
    for src, funcs in result.items():
        for name, nbytes in sorted(funcs.items(), key=lambda x: -x[1]):
            print(f"{nbytes:8d}  {src:16s} {name}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
