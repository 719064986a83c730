"""The gateway service: native ZMQ and OpenAI-compatible HTTP frontends, one asyncio loop."""

from services.gateway.main import Gateway, run_gateway

__all__ = ["Gateway", "run_gateway"]
