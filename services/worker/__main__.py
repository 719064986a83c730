"""`python -m services.worker --config FILE --name NAME`: one worker process."""

from __future__ import annotations

import logging
import os

import click

from common.config import MeshConfig


@click.command()
@click.option("--config", "config_path", default=None, help="Mesh config (TOML).")
@click.option("--name", required=True, help="Which worker of the config this process is.")
def main(config_path: str | None, name: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from services.worker.main import run_worker

    run_worker(MeshConfig.load(config_path), name)


if __name__ == "__main__":
    main()
