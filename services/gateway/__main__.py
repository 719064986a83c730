"""`python -m services.gateway --config PATH`: run the gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from common.config import ConfigError, MeshConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    parser.add_argument("--config", default=None,
                        help="mesh config TOML (default: the built-in default config)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    try:
        cfg = MeshConfig.load(args.config)
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    from services.gateway.main import run_gateway

    run_gateway(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
