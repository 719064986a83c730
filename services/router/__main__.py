"""`python -m services.router --config FILE`: the router process."""

from __future__ import annotations

import logging

import click

from common.config import MeshConfig


@click.command()
@click.option("--config", "config_path", default=None, help="Mesh config (TOML).")
def main(config_path: str | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from services.router.main import run_router

    run_router(MeshConfig.load(config_path))


if __name__ == "__main__":
    main()
