"""bench/pm_samples.py's timeline: the active span of a PM-sampling report, times from its
start (no report or ncu needed: the sampled metrics are made up here)."""

from __future__ import annotations

import pytest

from bench import pm_samples


def _metrics(dram: list[float], ctas: list[float]) -> dict[str, dict]:
    ids = [1000 * i + 1_796_318_494_912_071_250 for i in range(len(dram))]  # ns, 1 us apart
    out = {name: {"values": [float(i) for i in range(len(dram))], "ids": ids}
           for name in pm_samples.COLUMNS.values()}
    out[pm_samples.COLUMNS["dram_read_pct"]]["values"] = dram
    out[pm_samples.COLUMNS["ctas_launched"]]["values"] = ctas
    return out


def test_the_span_runs_from_the_first_to_the_last_busy_sample() -> None:
    line = pm_samples.timeline(_metrics([0, 0, 0.5, 50, 0, 90, 0, 0], [0, 0, 8, 0, 0, 0, 0, 0]))
    s = line["samples"]
    assert s["t_us"] == [0.0, 1.0, 2.0, 3.0]  # samples 2-5
    assert s["dram_read_pct"] == [0.5, 50, 0, 90]
    assert s["ctas_launched"] == [8, 0, 0, 0]
    assert s["l2_pct"] == [2.0, 3.0, 4.0, 5.0]
    assert line["span_us"] == 3.0 and line["interval_us"] == 1.0
    assert line["mean_dram_read_pct"] == pytest.approx(35.12, abs=0.01)
