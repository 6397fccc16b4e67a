"""Turn result CSVs into the paper's tables (Markdown + LaTeX).

    python experiments/make_tables.py                       # results/runs.csv, every metric
    python experiments/make_tables.py results/dllm.csv --metrics wiki.ppl --cols quant.name
    python experiments/make_tables.py --tag demo --last 3   # only the newest 3 rows tagged demo

Rows are grouped by ``--rows`` (default model, method) and pivoted on ``--cols`` (default
the quant setting), or, with ``--cols metric``, one column per metric plus their average
(the paper's methods x benchmarks layout). Rows that differ only in ``seed`` are aggregated
into ``mean ± std (n)``. The best value of each column within a model is bold; lower is better
for perplexity / NLL / error metrics, higher for everything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

BOOKKEEPING = {"quant_seconds", "wall_seconds", "peak_memory_mb", "seed", "eval_tokens"}


def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in ("ppl", "nll", "loss", "err", "bpb"))


def load(paths: list[str], tag: str | None = None, last: int | None = None) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths if Path(p).exists() and Path(p).stat().st_size]
    if not frames:
        raise SystemExit(f"no results in {paths}")
    df = pd.concat(frames, ignore_index=True)
    if "status" in df:
        df = df[df["status"] == "ok"]
    if tag is not None and "tag" in df:
        df = df[df["tag"].fillna("") == tag]
    return df.tail(last) if last else df


def metric_columns(df: pd.DataFrame) -> list[str]:
    config_prefixes = ("model.", "method.", "quant.", "calib.", "eval.", "logger.", "info.", "hydra")
    out = []
    for c in df.columns:
        if c.startswith(config_prefixes) or c in BOOKKEEPING or c.split(".")[-1] in BOOKKEEPING:
            continue
        if pd.api.types.is_numeric_dtype(df[c]) and c not in ("force", "progress", "save_model"):
            out.append(c)
    return out


def aggregate(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False, dropna=False)[metrics]
    mean, std, n = g.mean(), g.std(ddof=1), g.count()
    return pd.concat({"mean": mean, "std": std, "n": n}, axis=1)


def fmt(mean, std, n, digits) -> str:
    if pd.isna(mean):
        return "–"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {std:.{digits}f} ({int(n)})" if n > 1 and not pd.isna(std) else "")


def build_table(df: pd.DataFrame, rows: list[str], cols: str, metrics: list[str], digits: int = 2):
    """Returns (table of strings, table of means, bold mask)."""
    keys = rows + ([cols] if cols != "metric" else [])
    missing = [k for k in keys if k not in df]
    if missing:
        raise SystemExit(f"no column {missing} in the results (columns: {sorted(df.columns)[:20]} ...)")
    df = df.copy()
    df[keys] = df[keys].astype(object).where(df[keys].notna(), "–")  # a key a method does not have
    if cols == "metric":
        agg = aggregate(df, rows, metrics)
        means = agg["mean"].copy()
        higher = [m for m in metrics if not lower_is_better(m)]
        if len(higher) > 1:
            means["avg"] = means[higher].mean(axis=1)
        text = means.copy().astype(object)
        for m in metrics:
            for idx in means.index:
                text.loc[idx, m] = fmt(agg["mean"].loc[idx, m], agg["std"].loc[idx, m], agg["n"].loc[idx, m], digits)
        if "avg" in means:
            text["avg"] = means["avg"].map(lambda v: f"{v:.{digits}f}")
    else:
        if len(metrics) != 1:
            raise SystemExit(f"--cols {cols} needs exactly one --metrics (got {metrics})")
        m = metrics[0]
        agg = aggregate(df, rows + [cols], [m])
        means = agg["mean"][m].unstack(cols)
        stds, ns = agg["std"][m].unstack(cols), agg["n"][m].unstack(cols)
        text = means.copy().astype(object)
        for idx in means.index:
            for c in means.columns:
                text.loc[idx, c] = fmt(means.loc[idx, c], stds.loc[idx, c], ns.loc[idx, c], digits)
    bold = pd.DataFrame(False, index=means.index, columns=means.columns)
    group_level = rows[0] if len(rows) > 1 else None
    for c in means.columns:
        lower = lower_is_better(metrics[0] if cols != "metric" else str(c))
        groups = means.groupby(level=group_level) if group_level else [(None, means)]
        for _, sub in groups:
            col = sub[c].dropna()
            if len(col) > 1:
                bold.loc[col.idxmin() if lower else col.idxmax(), c] = True
    return text, means, bold


def to_markdown(text: pd.DataFrame, bold: pd.DataFrame) -> str:
    names = list(text.index.names)
    header = names + [str(c) for c in text.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx in text.index:
        keys = idx if isinstance(idx, tuple) else (idx,)
        cells = [f"**{text.loc[idx, c]}**" if bold.loc[idx, c] else str(text.loc[idx, c]) for c in text.columns]
        lines.append("| " + " | ".join([str(k) for k in keys] + cells) + " |")
    return "\n".join(lines)


def to_latex(text: pd.DataFrame, bold: pd.DataFrame) -> str:
    t = text.copy()
    for c in t.columns:
        t[c] = [f"\\textbf{{{v}}}" if b else v for v, b in zip(t[c], bold[c])]
    t = t.map(lambda v: str(v).replace("±", "$\\pm$"))
    return t.to_latex(escape=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", default=["results/runs.csv"])
    ap.add_argument("--rows", default="model.name,method.name")
    ap.add_argument("--cols", default="quant.name", help="a config column to pivot on, or 'metric'")
    ap.add_argument("--metrics", default=None, help="comma-separated metric columns (default: all found)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--last", type=int, default=None)
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.tex")
    a = ap.parse_args(argv)
    df = load(a.csv, a.tag, a.last)
    metrics = a.metrics.split(",") if a.metrics else metric_columns(df)
    if a.cols != "metric" and len(metrics) > 1:
        metrics = [next((m for m in metrics if m.endswith(".ppl")), metrics[0])]
    text, _, bold = build_table(df, a.rows.split(","), a.cols, metrics, a.digits)
    md, tex = to_markdown(text, bold), to_latex(text, bold)
    print(f"metric: {', '.join(metrics)}\n\n{md}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".md").write_text(md + "\n")
        Path(a.out + ".tex").write_text(tex)
        print(f"\nwrote {a.out}.md and {a.out}.tex")
    return 0


if __name__ == "__main__":
    sys.exit(main())
