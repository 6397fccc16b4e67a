"""The README's performance tables, rendered from ``results/perf.csv`` (the long format that
``bench_cost.py`` and ``bench_kernels.py`` append): what the numbers are is never typed by hand.

1. calibration cost and evaluation overhead per model x method (``bench_cost``);
2. the fused activation kernel per width x tokens (``bench_kernels``, ``fused_act_quant``).

Under each table: the device, the versions and the commit(s) that made the rows. Rows of several commits or of a
dirty tree are refused unless ``--allow-mixed`` (then the table says so).

    python experiments/perf_table.py results/perf.csv [--allow-mixed]
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from make_tables import commits as row_commits, not_reproducible

COST_COLUMNS = [  # (metric, header, format)
    ("layers", "layers timed", "{}"),
    ("calib_step_s", "s / step", "{:.3f}"),
    ("calib_per_layer_s_measured", "s / layer (measured)", "{:.1f}"),
    ("calib_per_layer_s", "s / layer (published settings)", "{:.1f}"),
    ("calib_total_s", "total (extrapolated)", "min"),
    ("peak_gpu_gb", "peak GPU GiB", "{:.1f}"),
    ("eval_overhead", "eval vs bf16, eager", "{:.2f}x"),
    ("eval_overhead_fused", "eval vs bf16, fused kernel", "{:.2f}x"),
    ("eval_overhead_graph", "eval vs bf16, both from CUDA graphs", "{:.2f}x"),
]
KERNEL_METRICS = [("kernel_graph_ms", "kernel ms (graph replay)", "{:.3f}"), ("kernel_ms", "one call ms", "{:.3f}"),
                  ("eager_ms", "eager ms", "{:.3f}"),
                  ("speedup_vs_eager", "speed-up", "{:.2f}x"), ("bandwidth", "TB/s", "{:.2f}"),
                  ("pct_peak_bw", "% of peak bandwidth", "{:.0f}%")]


def provenance(df: pd.DataFrame, allow_mixed: bool) -> str:
    """One line naming the device, versions and commit(s); refuses mixed or dirty commits unless allowed
    (what counts as dirty or unknown: make_tables.py's rule for result rows)."""
    commits = sorted(row_commits(df.rename(columns={"commit": "git_commit"})).unique())
    bad = len(commits) > 1 or any(not_reproducible(c) for c in commits)
    if bad and not allow_mixed:
        raise SystemExit(f"rows from commits {commits}: one clean commit is needed (--allow-mixed for a draft)")
    parts = []
    for col in ("device", "torch", "triton", "transformers"):
        vals = sorted(df[col].dropna().astype(str).unique()) if col in df else []
        parts.append(f"{col} {', '.join(vals) or '?'}")
    dates = df["timestamp"].astype(str).str[:10]
    line = f"{'; '.join(parts)}; {dates.min()} to {dates.max()}; commit {', '.join(commits)}"
    return line + (" (DRAFT: mixed or dirty commits)" if bad else "")


def _fmt(value, fmt: str) -> str:
    if pd.isna(value):
        return "–"
    if fmt == "min":
        return f"{value / 60:.1f} min"
    return fmt.format(value)


def cost_table(df: pd.DataFrame) -> str:
    cost = df[df["bench"] == "cost"].copy()
    if cost.empty:
        return "(no calibration rows)"
    cost["layers"] = cost["shape"].astype(str).str.extract(r"layers timed (\d+/\d+)")[0]
    cost["amp"] = cost["note"].astype(str).str.extract(r"amp=(\S+)")[0]
    keys = ["model", "method"]
    runs = cost.groupby(keys)["timestamp"].nunique()
    again = [f"{a}/{b}" for (a, b), n in runs.items() if n > 1]
    wide = cost.pivot_table(index=keys, columns="metric", values="value", aggfunc="last")
    if "calib_step_s" in wide:  # methods without training report 0
        wide.loc[wide["calib_step_s"] == 0, "calib_step_s"] = float("nan")
    meta = cost.groupby(keys)[["layers", "amp"]].agg(lambda s: s.dropna().iloc[-1] if s.notna().any() else "")
    wide = wide.join(meta)
    order = {m: i for i, m in enumerate(dict.fromkeys(cost["model"]))}
    morder = {m: i for i, m in enumerate(dict.fromkeys(cost["method"]))}
    wide = wide.sort_index(key=lambda ix: ix.map(order) if ix.name == "model" else ix.map(morder))
    head = ["model", "method", "amp"] + [h for _, h, _ in COST_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, method), r in wide.iterrows():
        amp = r.get("amp") if isinstance(r.get("amp"), str) and r.get("amp") != "-" else "–"
        cells = [model, method, amp] + [r.get(m, "") if m == "layers" else _fmt(r.get(m, float("nan")), f)
                                        for m, _, f in COST_COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if again:
        lines.append(f"\n(measured more than once, the last run shown: {', '.join(again)})")
    return "\n".join(lines)


def kernel_table(df: pd.DataFrame) -> str:
    k = df[(df["bench"] == "kernels") & (df["item"] == "fused_act_quant")]
    if k.empty:
        return "(no kernel rows)"
    wide = k.pivot_table(index=["shape", "tokens"], columns="metric", values="value", aggfunc="last")
    order = {s: i for i, s in enumerate(dict.fromkeys(k["shape"]))}
    wide = wide.sort_index(key=lambda ix: ix.map(order) if ix.name == "shape" else ix)
    head = ["width (factors)", "tokens"] + [h for _, h, _ in KERNEL_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, tokens), r in wide.iterrows():
        lines.append("| " + " | ".join([str(shape), str(int(tokens))] + [_fmt(r.get(m, float("nan")), f)
                                                                          for m, _, f in KERNEL_METRICS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--allow-mixed", action="store_true", help="render rows of several or dirty commits (a draft)")
    args = ap.parse_args(argv)
    df = pd.read_csv(args.csv, dtype={"commit": str})  # a short hash like 5e11741 is not a number
    line = provenance(df, args.allow_mixed)
    print(cost_table(df) + "\n\n" + kernel_table(df) + f"\n\n{line}")


if __name__ == "__main__":
    sys.exit(main())
