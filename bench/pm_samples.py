"""An Nsight Compute PM-sampling report (one value every ~1.5 us across a workload, e.g. a
whole CUDA graph from bench/step_trace.py) as a timeline: DRAM read throughput, L2 throughput
and hit rate, CTAs launched, per sample, over the span where anything ran.

    python3 bench/pm_samples.py step.ncu-rep --out timeline.json [--all all.json]

It reads the report with NVIDIA's `ncu_report` module: the PyPI package `ncu-report` (how
this machine reads one; the device's ncu has no Python module beside it), else the
extras/python folder beside the `ncu` on PATH. --all also writes every sampled metric.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

# timeline column -> metric (the TriageCompute set of the PmSampling section, sm_90)
COLUMNS = {
    "dram_read_pct": "FBSP.TriageCompute.dramc__read_throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_pct": "LTS.TriageCompute.lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_hit_pct": "LTS.TriageCompute.lts__average_t_sector_hit_rate_realtime.pct",
    "ctas_launched": "FE_B.TriageCompute.gr__ctas_launched_realtime.sum",
    "sm_active_cycles": "TPC.TriageCompute.sm__cycles_active.avg",
}


def import_ncu_report():
    """NVIDIA's report reader: the ncu-report package, else the one beside ncu."""
    try:
        import ncu_report  # noqa: PLC0415
        return ncu_report
    except ImportError:
        pass
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("no ncu_report module (pip install ncu-report) and no ncu on PATH")
    base = Path(os.path.realpath(ncu)).parent
    for cand in [base / "extras" / "python", *base.parent.glob("**/extras/python")]:
        if (cand / "ncu_report.py").exists():
            sys.path.insert(0, str(cand))
            import ncu_report  # noqa: PLC0415
            return ncu_report
    raise SystemExit(f"no ncu_report module (pip install ncu-report), none near {base}")


def sampled(action) -> dict[str, dict]:
    """Every metric of the action with more than one instance: values and correlation ids."""
    out = {}
    for name in action.metric_names():
        m = action.metric_by_name(name)
        n = m.num_instances()
        if n <= 1:
            continue
        entry = {"values": [m.as_double(i) for i in range(n)]}
        if m.has_correlation_ids():
            ids = m.correlation_ids()
            # timestamps in ns: integers (a double of ~1.8e18 is only good to 256 ns)
            entry["ids"] = [ids.as_uint64(i) for i in range(ids.num_instances())]
        out[name] = entry
    return out


def timeline(metrics: dict[str, dict]) -> dict:
    """The COLUMNS per sample over the active span (the first to the last sample where a CTA
    launched or the DRAM read), time in us from its start (the ids are timestamps in ns)."""
    ref = metrics[COLUMNS["dram_read_pct"]]
    ids, dram = ref["ids"], ref["values"]
    ctas = metrics[COLUMNS["ctas_launched"]]["values"]
    busy = [i for i in range(len(dram)) if ctas[i] > 0 or dram[i] > 1]
    i0, i1 = busy[0], busy[-1]
    rows = {"t_us": [round((ids[i] - ids[i0]) / 1e3, 2) for i in range(i0, i1 + 1)]}
    for col, name in COLUMNS.items():
        rows[col] = [round(v, 2) for v in metrics[name]["values"][i0:i1 + 1]]
    return {"span_us": rows["t_us"][-1],
            "interval_us": round(statistics.mean(
                b - a for a, b in zip(rows["t_us"], rows["t_us"][1:], strict=False)), 3),
            "mean_dram_read_pct": round(statistics.mean(rows["dram_read_pct"]), 2),
            "samples": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--out", required=True, help="the timeline (JSON)")
    p.add_argument("--all", help="also every sampled metric of every action (JSON)")
    args = p.parse_args()
    ncu_report = import_ncu_report()
    ctx = ncu_report.load_report(args.report)
    actions = [ctx.range_by_idx(r).action_by_idx(a) for r in range(ctx.num_ranges())
               for a in range(ctx.range_by_idx(r).num_actions())]
    metrics = [sampled(a) for a in actions]
    if args.all:
        Path(args.all).write_text(json.dumps([{"name": a.name(), "sampled": m}
                                              for a, m in zip(actions, metrics, strict=True)]))
    line = timeline(metrics[0])
    line.update(report=Path(args.report).name, workload=actions[0].name())
    Path(args.out).write_text(json.dumps(line))
    print(f"{line['workload']}: {line['span_us']:.1f} us, a sample every "
          f"{line['interval_us']:.2f} us, DRAM read {line['mean_dram_read_pct']:.1f}% of peak")


if __name__ == "__main__":
    main()
