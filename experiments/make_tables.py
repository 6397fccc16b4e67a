"""Turn result CSVs into the paper's tables (Markdown + LaTeX), each with the commit its rows come from.

    python experiments/make_tables.py                       # results/runs.csv, every metric
    python experiments/make_tables.py results/dllm.csv --metrics wiki.ppl --cols quant.name
    python experiments/make_tables.py --tag demo --last 3   # only the newest 3 rows tagged demo
    python experiments/make_tables.py results/dllm.csv --metrics wiki.nll --paired method.name=flatquant
    python experiments/make_tables.py results/old.csv --allow-mixed   # a draft from several commits

Rows are grouped by ``--rows`` (default model, method) and pivoted on ``--cols`` (default the quant
setting, one table per metric), or, with ``--cols metric``, one column per metric plus their average (the
paper's methods x benchmarks layout). ``--metrics`` defaults to every metric column found (numeric result
columns: not config keys, timings, token or sample counts). The best value of each column within a model
is bold; lower is better for perplexity / NLL / error metrics, higher for everything else.

Only seeds are averaged: the rows of one cell must have the same config (every model./method./quant./
calib./eval. key and ``device``) except ``seed``, one row per seed; they are shown as ``mean ± std (n)``.
Rows that differ in another config column are shown apart: that column joins ``--rows`` (the footer says
which), unless ``--allow-mixed``.

Provenance: under each table, the commit its rows come from (the rows' ``git_commit``) and their number.
A table whose rows come from several commits, from a dirty tree (``+dirty``) or an unknown commit, or a
cell whose rows differ in more than the seed (or repeat a seed), is refused: one line on stderr, exit 2,
nothing written. ``--allow-mixed`` renders it anyway; the footer then lists every commit with its row
count and the cells that average more than seeds, and says DRAFT when any row is dirty or of unknown commit.

``--paired KEY=VALUE`` adds a table of per-seed differences against a baseline: the rows whose KEY is
VALUE, within the same model (and the same ``--cols`` value when pivoting). For every other row group and
metric: mean of (row group - baseline) over the seeds both have, its 95% Student-t interval (n - 1 degrees
of freedom), n, and whether the interval excludes 0.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from freeact.tracking.results import read_rows

BOOKKEEPING = {"quant_seconds", "wall_seconds", "peak_memory_mb", "seed", "eval_tokens"}
# columns a run writes that are neither its config nor its metrics
NOT_CONFIG = {"run_hash", "status", "timestamp", "git_commit", "run_dir", "artifact", "wandb_dir", "device_name",
              "torch", "transformers", "results_file", "force", "progress", "tag", "save_model",
              "quant_seconds", "wall_seconds", "peak_memory_mb"}
NOT_CONFIG_PREFIXES = ("info.", "logger.", "hydra")
CONFIG_PREFIXES = ("model.", "method.", "quant.", "calib.", "eval.")
UNKNOWN_COMMIT = "unknown"

# two-sided 95% Student t quantiles, t_{0.975, dof} for dof = 1..30 (scipy.stats.t.ppf(0.975, dof))
T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]


class Refused(Exception):
    """Rows that must not be aggregated into one table without --allow-mixed (message: one line)."""


def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in ("ppl", "nll", "loss", "err", "bpb", "seconds", "memory", "_mb"))


def load(paths: list[str], tag: str | None = None, last: int | None = None) -> pd.DataFrame:
    frames = [f for f in map(read_rows, paths) if len(f)]  # hashes read as text there
    if not frames:
        raise SystemExit(f"no results in {paths}")
    df = pd.concat(frames, ignore_index=True)
    if "status" in df:
        df = df[df["status"] == "ok"]
    if tag is not None and "tag" in df:
        df = df[df["tag"].fillna("") == tag]
    return df.tail(last) if last else df


def _measured_columns(df: pd.DataFrame) -> list[str]:
    """Numeric result columns: metrics plus per-metric counts and timings (everything a run measured)."""
    return [c for c in df.columns
            if not c.startswith(CONFIG_PREFIXES + NOT_CONFIG_PREFIXES) and c not in NOT_CONFIG and c != "seed"
            and pd.api.types.is_numeric_dtype(df[c])]


def _is_count(c: str) -> bool:
    last = c.split(".")[-1]
    return last in BOOKKEEPING or last == "n" or last.startswith("n_")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Every metric found: numeric result columns with a value, without timings and token / sample counts."""
    return [c for c in _measured_columns(df)
            if not _is_count(c) and c not in ("force", "progress", "save_model") and df[c].notna().any()]


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns that make a run's config, except ``seed``."""
    measured = set(_measured_columns(df))
    return [c for c in df.columns
            if c != "seed" and c not in NOT_CONFIG and not c.startswith(NOT_CONFIG_PREFIXES)
            and (c.startswith(CONFIG_PREFIXES) or c not in measured)]


def aggregate(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False, dropna=False)[metrics]
    mean, std, n = g.mean(), g.std(ddof=1), g.count()
    return pd.concat({"mean": mean, "std": std, "n": n}, axis=1)


def fmt(mean, std, n, digits) -> str:
    if pd.isna(mean):
        return "–"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {std:.{digits}f} ({int(n)})" if n > 1 and not pd.isna(std) else "")


def _fill_keys(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    df = df.copy()
    df[keys] = df[keys].astype(object).where(df[keys].notna(), "–")  # a key a method does not have
    return df


def build_table(df: pd.DataFrame, rows: list[str], cols: str, metrics: list[str], digits: int = 2):
    """Returns (table of strings, table of means, bold mask)."""
    keys = rows + ([cols] if cols != "metric" else [])
    missing = [k for k in keys if k not in df]
    if missing:
        raise SystemExit(f"no column {missing} in the results (columns: {sorted(df.columns)[:20]} ...)")
    df = _fill_keys(df, keys)
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


# ----------------------------------------------------------------------------------------------------------
# provenance and the seeds-only rule

def commits(df: pd.DataFrame) -> pd.Series:
    """Each row's commit; missing or empty ones are 'unknown'."""
    if "git_commit" not in df:
        return pd.Series(UNKNOWN_COMMIT, index=df.index, dtype=object)
    c = df["git_commit"].astype(object).where(df["git_commit"].notna(), UNKNOWN_COMMIT).astype(str).str.strip()
    return c.where(c != "", UNKNOWN_COMMIT)


def not_reproducible(commit: str) -> bool:
    return commit.endswith("+dirty") or commit.startswith(UNKNOWN_COMMIT)


def commit_counts(df: pd.DataFrame) -> list[tuple[str, int]]:
    counts = commits(df).value_counts()
    return sorted(((str(c), int(n)) for c, n in counts.items()), key=lambda cn: (-cn[1], cn[0]))


def _rows(n: int) -> str:
    return f"{n} row" + ("" if n == 1 else "s")


def provenance_problem(df: pd.DataFrame) -> str | None:
    """Why these rows must not make one table (None: one clean commit)."""
    counts = commit_counts(df)
    listed = ", ".join(f"{c} ({_rows(n)})" for c, n in counts)
    bad = [(c, n) for c, n in counts if not_reproducible(c)]
    if bad:
        k = sum(n for _, n in bad)
        return (f"{k} of {_rows(len(df))} come from a dirty tree or an unknown commit ({listed}): rerun them "
                "from a clean commit, or --allow-mixed for a draft")
    if len(counts) > 1:
        return (f"the rows come from {len(counts)} commits ({listed}): a table comes from one commit; rerun, "
                "select rows (--tag, --last), or --allow-mixed")
    return None


def _label(idx) -> str:
    return " | ".join(str(k) for k in (idx if isinstance(idx, tuple) else (idx,)))


def _differ(g: pd.DataFrame, config: list[str]) -> list[str]:
    """The config columns in which the rows of ``g`` differ (NaN counts as one value)."""
    return [c for c in config if c in g and g[c].nunique(dropna=False) > 1]


def differing_columns(df: pd.DataFrame, keys: list[str], config: list[str]) -> list[str]:
    """Config columns in which the rows of some group of ``keys`` differ: adding them to the keys shows
    those rows apart instead of averaging runs that are not seeds of one config."""
    out = []
    for _, g in df.groupby(keys, sort=False, dropna=False):
        if len(g) > 1:
            out += [c for c in _differ(g, config) if c not in out and c not in keys]
    return out


def mixed_cells(df: pd.DataFrame, keys: list[str], config: list[str], what: str = "cell") -> list[tuple[str, str]]:
    """Groups of ``keys`` whose rows differ in more than the seed, or repeat a seed with one config.

    Returns (refusal: one line with the fix, note for the footer when rendered anyway) per such group."""
    out = []
    seeds = df["seed"] if "seed" in df else pd.Series(float("nan"), index=df.index)
    for idx, g in df.groupby(keys, sort=False, dropna=False):
        if len(g) < 2:
            continue
        s = seeds.loc[g.index]
        where = f"{what} {_label(idx)}".strip()
        seed_list = ", ".join(str(v) for v in s.tolist())
        differ = _differ(g, config)
        if differ:
            cols = ", ".join(differ)
            out.append((f"{where} would average {_rows(len(g))} (seeds {seed_list}) that differ in {cols}, not "
                        f"only in seed: add {'it' if len(differ) == 1 else 'them'} to --rows, or --allow-mixed "
                        "to average them anyway",
                        f"{where} averages {_rows(len(g))} (seeds {seed_list}) that differ in {cols}"))
        elif s.duplicated().any():
            out.append((f"{where} has {_rows(len(g))} of one config with repeated seeds ({seed_list}): duplicate "
                        "runs; keep one, or --allow-mixed to average them anyway",
                        f"{where} averages duplicate runs of one config (seeds {seed_list})"))
    return out


def footer(df: pd.DataFrame, notes: list[str]) -> list[str]:
    """The lines printed under a table: its commit(s) and what was mixed."""
    counts = commit_counts(df)
    lines = []
    bad = sum(n for c, n in counts if not_reproducible(c))
    if bad:
        lines.append(f"DRAFT: {bad} of {_rows(len(df))} from a dirty tree or an unknown commit "
                     "(not reproducible from a commit)")
    if len(counts) == 1:
        lines.append(f"rows from commit {counts[0][0]} ({_rows(counts[0][1])})")
    else:
        lines.append(f"rows from {len(counts)} commits: " + ", ".join(f"{c} ({_rows(n)})" for c, n in counts))
    return lines + notes


def _tex_text(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("$", "\\$"), ("±", "$\\pm$"), ("DRAFT", "\\textbf{DRAFT}")):
        s = s.replace(a, b)
    return s


def footer_markdown(lines: list[str]) -> str:
    return "  \n".join(lines)  # two trailing spaces: a line break


def footer_latex(lines: list[str]) -> str:
    return "\\par\\smallskip{\\footnotesize " + " \\\\\n".join(_tex_text(x) for x in lines) + "}\n"


# ----------------------------------------------------------------------------------------------------------
# paired comparison

def t_quantile_975(dof: int) -> float:
    """t_{0.975} with ``dof`` degrees of freedom (the half-width factor of a two-sided 95% interval)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:
        pass
    if 1 <= dof <= len(T975):
        return T975[dof - 1]
    z = 1.959963984540054  # Cornish-Fisher expansion around the normal quantile; < 1e-5 off beyond 30 dof
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


def _matches(col: pd.Series, value: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(col):
        try:
            return (col - float(value)).abs() <= 1e-12 * max(1.0, abs(float(value)))
        except ValueError:
            pass
    return col.astype(str) == value


def paired_differences(df: pd.DataFrame, rows: list[str], cols: str, metrics: list[str], key: str, value: str,
                       config: list[str] | None = None):
    """Per-seed differences (row group - baseline) against the rows whose ``key`` is ``value``.

    The baseline is taken within each stratum: the same ``model.name`` and, when pivoting, the same ``cols``
    value. Every other row group (``rows`` + ``cols`` keys) of the stratum is matched to it on ``seed``.
    Returns (frame indexed by group keys + metric with columns mean, lo, hi, n; the rows used; baselines that
    repeat a seed or differ in more than the seed, as ``mixed_cells`` gives them). With duplicates in the
    baseline or a row group, the per-seed values are their means."""
    if key not in df:
        raise SystemExit(f"--paired: no column {key} in the results")
    if "seed" not in df:
        raise SystemExit("--paired: the results have no seed column to pair on")
    match = _matches(df[key], value)
    if not match.any():
        vals = sorted(df[key].dropna().astype(str).unique())[:12]
        raise SystemExit(f"--paired: no row has {key}={value} (values: {', '.join(vals)})")
    pivot = cols != "metric"
    strata = [k for k in ["model.name"] + ([cols] if pivot else []) if k in df and k != key]
    groups = list(dict.fromkeys([k for k in strata if k == "model.name" and k not in rows] + rows
                                + ([cols] if pivot else [])))
    df = _fill_keys(df, list(dict.fromkeys(strata + groups)))
    config = config_columns(df) if config is None else config
    records, used, problems = [], [], []
    for sidx, stratum in (df.groupby(strata, sort=False, dropna=False) if strata else [((), df)]):
        base = stratum[match.loc[stratum.index]]
        if base.empty:
            continue
        label = f"baseline {key}={value}" + (f" in {_label(sidx)}" if strata else "")
        problems += mixed_cells(base.assign(_baseline=""), ["_baseline"], config, label)
        base_by_seed = base.groupby("seed")[metrics].mean()
        others = stratum[~match.loc[stratum.index]]
        for gidx, g in others.groupby(groups, sort=False, dropna=False):
            by_seed = g.groupby("seed")[metrics].mean()
            gidx = gidx if isinstance(gidx, tuple) else (gidx,)
            common_any = set()
            for m in metrics:
                d = (by_seed[m] - base_by_seed[m]).dropna()
                n = len(d)
                mean = float(d.mean()) if n else float("nan")
                if n >= 2:
                    half = t_quantile_975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
                    lo, hi = mean - half, mean + half
                else:
                    lo = hi = float("nan")
                if n == 0 and g[m].isna().all():
                    continue  # this row group has no value of this metric
                records.append((*gidx, m, mean, lo, hi, n))
                common_any |= set(d.index)
            used.append(g[g["seed"].isin(common_any)])
            used.append(base[base["seed"].isin(common_any)])
    out = pd.DataFrame(records, columns=groups + ["metric", "mean", "lo", "hi", "n"]).set_index(groups + ["metric"])
    used_rows = pd.concat(used) if used else df.iloc[:0]
    used_rows = used_rows[~used_rows.index.duplicated()]
    return out, used_rows, problems


def paired_text(diff: pd.DataFrame, digits: int) -> pd.DataFrame:
    def num(v):
        return "–" if pd.isna(v) else f"{v:+.{digits}f}"

    text = pd.DataFrame(index=diff.index, columns=["mean diff", "95% CI", "n", "CI excludes 0"], dtype=object)
    for idx, r in diff.iterrows():
        ok = r["n"] >= 2 and not pd.isna(r["lo"])
        excl = ("yes: lower" if r["hi"] < 0 else "yes: higher" if r["lo"] > 0 else "no") if ok else "– (n < 2)"
        text.loc[idx] = [num(r["mean"]), f"[{num(r['lo'])}, {num(r['hi'])}]" if ok else "–", str(int(r["n"])), excl]
    return text


# ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", default=["results/runs.csv"])
    ap.add_argument("--rows", default="model.name,method.name")
    ap.add_argument("--cols", default="quant.name",
                    help="a config column to pivot on (one table per metric), or 'metric'")
    ap.add_argument("--metrics", default=None,
                    help="comma-separated metric columns (default: all found, i.e. every numeric result column "
                         "with a value except timings and token / sample counts)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--last", type=int, default=None)
    ap.add_argument("--digits", type=int, default=2, help="decimals (the --paired table uses one more)")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.tex")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="render rows from several commits, a dirty tree or an unknown commit, and cells that "
                         "differ in more than seed; the footer lists the commits and marks the table DRAFT "
                         "when any row is dirty or of unknown commit")
    ap.add_argument("--paired", default=None, metavar="KEY=VALUE",
                    help="add per-seed differences against the rows whose KEY is VALUE (same model), e.g. "
                         "method.name=flatquant: mean, 95%% Student-t interval, n, whether it excludes 0")
    a = ap.parse_args(argv)
    if a.paired is not None and "=" not in a.paired:
        ap.error(f"--paired needs KEY=VALUE (got {a.paired!r})")
    df = load(a.csv, a.tag, a.last)
    rows = a.rows.split(",")
    metrics = a.metrics.split(",") if a.metrics else metric_columns(df)
    if not metrics:
        raise SystemExit(f"no metric columns in {a.csv}")
    missing = [m for m in metrics if m not in df]
    if missing:
        raise SystemExit(f"no metric {missing} in the results (metrics found: {metric_columns(df)})")
    config = config_columns(df)
    keys = rows + ([a.cols] if a.cols != "metric" else [])
    for k in keys:
        if k not in df:
            raise SystemExit(f"no column {[k]} in the results (columns: {sorted(df.columns)[:20]} ...)")
    split = [] if a.allow_mixed else differing_columns(_fill_keys(df, keys), keys, config)
    apart = [f"rows that differ in {', '.join(split)} besides the seed are shown apart (not averaged); "
             "--allow-mixed averages them"] if split else []
    rows, keys = rows + split, keys + split

    # one table per metric when pivoting on a config column, one table of all metrics with --cols metric
    problems, blocks = [], []  # blocks: (title, markdown, latex)
    for table_metrics in ([metrics] if a.cols == "metric" else [[m] for m in metrics]):
        sub = df[df[table_metrics].notna().any(axis=1)]
        if sub.empty:
            continue
        text, _, bold = build_table(sub, rows, a.cols, table_metrics, a.digits)
        mixed = mixed_cells(_fill_keys(sub, keys), keys, config)
        problem = provenance_problem(sub)
        problems += ([problem] if problem else []) + [refusal for refusal, _ in mixed]
        lines = footer(sub, apart + [note for _, note in mixed])
        title = f"metric: {', '.join(table_metrics)}"
        blocks.append((title, to_markdown(text, bold) + "\n\n" + footer_markdown(lines),
                       to_latex(text, bold) + footer_latex(lines)))
    if a.paired is not None:
        key, value = a.paired.split("=", 1)
        diff, used, base_problems = paired_differences(df[df[metrics].notna().any(axis=1)], rows, a.cols, metrics,
                                                       key, value, config)
        problems += [refusal for refusal, _ in base_problems]
        if len(used):
            problem = provenance_problem(used)
            problems += [problem] if problem else []
        title = (f"difference vs {value} ({key}={value}), per seed; negative = lower; 95% CI: Student t with "
                 "n - 1 dof over the seeds both have")
        text = paired_text(diff, a.digits + 1)
        lines = footer(used, [note.replace(" averages ", " averaged per seed: ", 1) for _, note in base_problems]
                       ) if len(used) else ["no seeds in common with the baseline"]
        blocks.append((title, to_markdown(text, pd.DataFrame(False, index=text.index, columns=text.columns))
                       + "\n\n" + footer_markdown(lines),
                       "\\noindent{\\small " + _tex_text(title) + "}\\par\n" + text.to_latex(escape=True)
                       + footer_latex(lines)))
    if problems and not a.allow_mixed:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        print(f"make_tables: refused: {problems[0]}{more}", file=sys.stderr)
        return 2

    print("\n\n".join(f"{t}\n\n{md}" for t, md, _ in blocks))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        several = len(blocks) > 1
        Path(a.out + ".md").write_text("\n\n".join((f"{t}\n\n" if several else "") + md for t, md, _ in blocks) + "\n")
        Path(a.out + ".tex").write_text("\n".join((f"% {t}\n" if several else "") + tex for t, _, tex in blocks))
        print(f"\nwrote {a.out}.md and {a.out}.tex")
    return 0


if __name__ == "__main__":
    sys.exit(main())
