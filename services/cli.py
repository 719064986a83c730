"""`nanopd` command line."""

from __future__ import annotations

import json
import os
import sys

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


if __name__ == "__main__":
    main()
