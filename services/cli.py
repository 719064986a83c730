"""`nanopd` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group()
def main() -> None:
    """nanopd: prefill/decode disaggregated LLM serving."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, the checkpoint's on GPU).")
@click.option("--max-tokens", default=64, show_default=True, type=int, help="New tokens per prompt at most.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", default=-1, show_default=True, type=int, help="Sample among the k likeliest; -1 is off.")
@click.option("--seed", default=None, type=int, help="Per-request seed: same seed, same tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--block-size", default=16, show_default=True, type=int, help="Tokens per KV block.")
@click.option("--max-num-batched-tokens", default=8192, show_default=True, type=int, help="Token budget of one step.")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap each prompt in the chat template if the model has one.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt, in order.")
def generate(prompts: tuple[str, ...], model: str | None, device: str, dtype: str | None,
             max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             ignore_eos: bool, block_size: int, max_num_batched_tokens: int, chat: bool,
             as_json: bool) -> None:
    """Generate completions for PROMPTS with the offline engine."""
    from services.worker.engine import LLM, SamplingParams, SamplingParamsError

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, ignore_eos=ignore_eos,
        )
        llm = LLM(model=model, device=device, dtype=dtype, block_size=block_size,
                  max_num_batched_tokens=max_num_batched_tokens)
    except (SamplingParamsError, ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from e
    use_chat = chat and llm.tokenizer is not None and bool(getattr(llm.tokenizer, "chat_template", None))
    inputs = [llm.chat_prompt(p) if use_chat else p for p in prompts]
    try:
        outputs = llm.generate(inputs, params)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    for prompt, out in zip(prompts, outputs, strict=True):
        if as_json:
            record = {
                "prompt": prompt, "prompt_token_ids": out.prompt_token_ids,
                "token_ids": out.token_ids, "text": out.text,
                "finish_reason": out.outputs[0].finish_reason,
            }
            click.echo(json.dumps(record))
        else:
            click.echo(out.text.strip())
    sys.stdout.flush()


# ---- the mesh: up, down, status, restart, logs
def _mesh_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--run-dir", envvar="NANOPD_RUN_DIR", default=None, help="The mesh's run dir (sockets, logs, status); default: the config's run_dir. Env: NANOPD_RUN_DIR.")(f)
    return click.option("--config", "config_path", default=None, help="Mesh config (TOML); default: one worker per GPU, or collocated + prefill + decode workers on the CPU.")(f)


def _run_path(config_path: str | None, run_dir: str | None) -> Path:
    from common.config import ConfigError
    from services.launcher_config import resolve_run_dir

    try:
        return resolve_run_dir(run_dir, config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e


def _launcher_call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    from common.config import ConfigError
    from services.launcher import LaunchError

    try:
        return fn(*args, **kw)
    except (ConfigError, LaunchError) as e:
        raise click.ClickException(str(e)) from e


@main.command()
@_mesh_options
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=float, help="Seconds to wait for every service to become healthy (CPU workers load a model first).")
def up(config_path: str | None, run_dir: str | None, timeout_s: float) -> None:
    """Start the gateway, router and workers, each its own process; return once all are healthy."""
    from services import launcher

    _launcher_call(launcher.up, config_path, run_dir, timeout_s, echo=click.echo)


@main.command()
@_mesh_options
@click.option("--timeout", "timeout_s", default=10.0, show_default=True, type=float, help="Seconds between SIGTERM and SIGKILL.")
def down(config_path: str | None, run_dir: str | None, timeout_s: float) -> None:
    """Stop every service of the mesh (SIGTERM, then SIGKILL after --timeout)."""
    from services import launcher

    run_path = _run_path(config_path, run_dir)
    rows = _launcher_call(launcher.down, run_path, timeout_s)
    if not rows:
        click.echo(f"no mesh running in {run_path}")
    for row in rows:
        click.echo(f"{row['name']:<12} pid {row['pid']:<8} {row['how']}")


@main.command("status")
@_mesh_options
@click.option("--json", "as_json", is_flag=True, help="A JSON list: name, pid, role, device, healthy, state, log.")
@click.option("--check", is_flag=True, help="Exit with 1 unless a mesh runs and every service is healthy.")
def status_cmd(config_path: str | None, run_dir: str | None, as_json: bool, check: bool) -> None:
    """Show every service: role, device, pid, health."""
    from services import launcher

    run_path = _run_path(config_path, run_dir)
    rows = _launcher_call(launcher.status, run_path)
    if as_json:
        click.echo(json.dumps(rows))
    elif not rows:
        click.echo(f"no mesh in {run_path}; start one with `nanopd up`")
    else:
        click.echo(f"{'NAME':<12} {'ROLE':<11} {'DEVICE':<8} {'PID':<8} STATE")
        for r in rows:
            click.echo(f"{r['name']:<12} {r['role']:<11} {r['device']:<8} {r['pid'] or '-':<8} {r['state']}")
    if check and not (rows and all(r["healthy"] for r in rows)):
        sys.exit(1)


@main.command()
@click.argument("name")
@_mesh_options
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=float, help="Seconds to wait for the service to become healthy again.")
def restart(name: str, config_path: str | None, run_dir: str | None, timeout_s: float) -> None:
    """Stop service NAME and start it again (same command line); the others keep running."""
    from services import launcher

    run_path = _run_path(config_path, run_dir)
    row = _launcher_call(launcher.restart, name, run_path, timeout_s, echo=click.echo)
    click.echo(f"{row['name']} {row['state']}, pid {row['pid']}")


@main.command()
@click.argument("name")
@_mesh_options
@click.option("-n", "--lines", "num_lines", default=50, show_default=True, type=int, help="How many of the last lines to print.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing lines as they are written (Ctrl-C stops).")
def logs(name: str, config_path: str | None, run_dir: str | None, num_lines: int, follow: bool) -> None:
    """Print the end of service NAME's log (stdout and stderr)."""
    from services import launcher

    run_path = _run_path(config_path, run_dir)
    for line in _launcher_call(launcher.logs, name, run_path, num_lines):
        click.echo(line)
    if follow:
        try:
            for line in _launcher_call(launcher.follow, name, run_path):
                click.echo(line)
        except KeyboardInterrupt:
            pass


# ---- a client of the running mesh
@main.command()
@click.argument("prompt")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--max-tokens", default=64, show_default=True, type=int, help="New tokens at most.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=None, type=float, help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", default=None, type=int, help="Sample among the k likeliest; -1 is off.")
@click.option("--seed", default=None, type=int, help="Per-request seed: same seed, same tokens.")
@click.option("--route", default="auto", show_default=True, type=click.Choice(["auto", "collocated", "disaggregated"]), help="Let the router decide, or force one way.")
@click.option("--raw", is_flag=True, help="Send the prompt as it is, without the chat template.")
@click.option("--address", envvar="NANOPD_GATEWAY", default=None, help="The gateway's ZMQ address (default: the running mesh's, else tcp://127.0.0.1:5555). Env: NANOPD_GATEWAY.")
@_mesh_options
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=float, help="Seconds to wait for each answer from the gateway.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (with --stream: one per delta).")
def submit(prompt: str, stream: bool, max_tokens: int, temperature: float, top_p: float | None,
           top_k: int | None, seed: int | None, route: str, raw: bool, address: str | None,
           config_path: str | None, run_dir: str | None, timeout_s: float, as_json: bool) -> None:
    """Send PROMPT to the running mesh's gateway and print the answer."""
    from dataclasses import asdict

    from services.client import Client, ClientError

    address = address or _gateway_address(_run_path(config_path, run_dir))
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed}
    printed = False
    with Client(address, timeout_s) as client:
        try:
            if not stream:
                out = client.generate(prompt, chat=not raw, route=route, **sampling)
                click.echo(json.dumps(asdict(out)) if as_json else out.text.strip())
                return
            for delta in client.stream(prompt, chat=not raw, route=route, **sampling):
                if as_json:
                    click.echo(json.dumps({"rid": delta.rid, "index": delta.index, "text": delta.text, "token_ids": delta.token_ids, "finish_reason": delta.finish_reason}))
                else:
                    click.echo(delta.text, nl=False)
                    printed = True
            if printed:
                click.echo()
        except ClientError as e:
            if printed:
                click.echo()
            raise click.ClickException(str(e)) from e


def _gateway_address(run_path: Path) -> str:
    """The gateway address in the run dir's mesh.toml (left by `nanopd up`), else the default."""
    from common.config import ConfigError, MeshConfig
    from services.client import DEFAULT_ADDRESS
    from services.launcher_config import MESH_FILE

    mesh = run_path / MESH_FILE
    if not mesh.exists():
        return DEFAULT_ADDRESS
    try:
        return MeshConfig.load(mesh).gateway_zmq
    except ConfigError:
        return DEFAULT_ADDRESS


if __name__ == "__main__":
    main()
