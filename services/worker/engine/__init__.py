"""The engine: paged KV cache, continuous batching, chunked prefill, sampling."""

from services.worker.engine.llm import LLM, CompletionOutput, RequestOutput
from services.worker.engine.sampling_params import SamplingParams, SamplingParamsError

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "SamplingParamsError"]
