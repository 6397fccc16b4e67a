"""The reproduction study's numbers, regenerated from its result CSVs (issue 12).

    python experiments/repro/report.py results/repro/testbed_dllm.csv results/repro/testbed_dream_reduced.csv \
        --out results/repro/report.md --energy-dir results/repro

For each CSV (one testbed): the table of every method label (mean ± std over seeds, n), the per-seed
paired differences against FlatQuant and of each token split against its no-split control (same basis,
``r = 0``), with 95% Student-t intervals, the per-type energy that the zeroing removes (before / after
training, median over layers and sites) and the calibration time. Each section names the commit its rows
come from; rows from several commits or a dirty tree are refused (as ``make_tables.py`` does) unless
``--allow-mixed``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import make_tables as mt  # noqa: E402  (experiments/make_tables.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jobs  # noqa: E402  (experiments/repro/jobs.py: the sweeps)

from freeact.analysis import logged_energies  # noqa: E402

# (token split, its no-split control on the same basis)
SPLITS = [("freeact", "freeact_r0"), ("freeact_dense", "freeact_dense_r0"), ("freeact_spectral", "freeact_dense_r0"),
          ("freeact_flat", "freeact_flat_r0")]
# the iso-time control: this method against FlatQuant, each also run with the epochs that give it the other's
# block-training time (labels <method>_<N>ep, experiments/repro/iso_time.sh)
ISO_TIME = ("freeact_flat_r0", "flatquant")
METRICS = ("wiki.nll", "wiki.ppl", "mm_easyvqa.vqa_acc")


def _metric(df: pd.DataFrame) -> str:
    for m in METRICS:
        if m in df and df[m].notna().any():
            return m
    raise SystemExit(f"no known metric ({', '.join(METRICS)}) in the results")


def _paired(df: pd.DataFrame, metric: str, a: str, b: str) -> tuple[float, float, float, int]:
    """Mean, 95% interval and n of per-seed ``a - b`` (method labels)."""
    sa = df[df["method.label"] == a].groupby("seed")[metric].mean()
    sb = df[df["method.label"] == b].groupby("seed")[metric].mean()
    d = (sa - sb).dropna()
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else float("nan")), float("nan"), float("nan"), n
    half = mt.t_quantile_975(n - 1) * float(d.std(ddof=1)) / n ** 0.5
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n


def iso_time_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """The iso-time comparisons present among ``labels``: ``<method>_<M>ep`` (fewer epochs) against FlatQuant,
    and the method against ``flatquant_<N>ep`` (more epochs), for ``(method, FlatQuant) = ISO_TIME``."""
    method, ref = ISO_TIME
    pairs = []
    for k in labels:
        m = re.fullmatch(r"(.+)_(\d+)ep", k)
        if m and m[1] == method and ref in labels:
            pairs.append((k, ref))
        elif m and m[1] == ref and method in labels:
            pairs.append((method, k))
    return pairs


def _fmt_ci(mean, lo, hi, n, digits=4) -> str:
    if n < 2:
        return f"{mean:+.{digits}f} (n = {n})"
    excl = "lower" if hi < 0 else "higher" if lo > 0 else "interval contains 0"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (n = {n}; {excl})"


def section(path: str, allow_mixed: bool, energy_dir: str | None = None) -> list[str]:
    df = mt.load([path])
    problem = mt.provenance_problem(df)
    if problem and not allow_mixed:
        raise SystemExit(f"{path}: {problem}")
    metric = _metric(df)
    model = df["model.name"].iloc[0]
    lines = [f"## {model} ({Path(path).name})", "",
             f"Metric: `{metric}` ({'lower' if mt.lower_is_better(metric) else 'higher'} is better). "
             + "; ".join(mt.footer(df, [_devices(df)])), ""]
    cov = coverage(df, Path(path).stem)
    if cov is not None:
        lines += cov[0]
    g = df.groupby("method.label", sort=False)[metric].agg(["mean", "std", "count"])
    g = g.sort_values("mean", ascending=mt.lower_is_better(metric))
    lines += ["| method.label | mean ± std (n) |", "|---|---|"]
    lines += [f"| {k} | {mt.fmt(r['mean'], r['std'], r['count'], 4)} |" for k, r in g.iterrows()]
    lines += ["", "Per-seed difference against FlatQuant (95% Student-t interval over seeds):", "",
              "| method.label | minus flatquant |", "|---|---|"]
    for k in g.index:
        if k != "flatquant" and "flatquant" in g.index:
            lines.append(f"| {k} | {_fmt_ci(*_paired(df, metric, k, 'flatquant'))} |")
    pairs = [(a, b) for a, b in SPLITS if a in g.index and b in g.index]
    if pairs:
        lines += ["", "What the token split changes (split minus its no-split control on the same basis, per seed):",
                  "", "| split | control | difference |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {_fmt_ci(*_paired(df, metric, a, b))} |" for a, b in pairs]
    iso = iso_time_pairs(list(g.index))
    if iso:
        lines += ["", "Iso-time control (each of the two given the other's block-training time through its epoch count, "
                  "from their times alone on the GPU: `results/repro/iso_time_ratio.csv`; per seed):", "",
                  "| method.label | against | difference |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {_fmt_ci(*_paired(df, metric, a, b))} |" for a, b in iso]
    e = logged_energies(df)
    e = e[e["site"].notna()] if len(e) else e
    if len(e):  # labels whose unique blocks are empty (r = 0, or one token type) zero nothing: no energy to show
        zeroes = e.groupby("method")[["energy_init", "energy_final"]].transform("max").sum(axis=1) > 0
        e = e[zeroes]
    if energy_dir and len(e):
        out = Path(energy_dir) / f"energy_{Path(path).stem}.csv"
        e.to_csv(out, index=False)
        print(f"wrote {out}")
    if len(e):
        lines += ["", "Energy the zeroing removes per token type (fraction of that type's transformed activation "
                  "energy on the other types' unique coordinates; median / max over layers, sites and seeds), and "
                  "the per-type relative block-output error of the last epoch (median over layers):", "",
                  "| method.label | type | energy at init (median / max) | after training (median / max) "
                  "| block error |", "|---|---|---|---|---|"]
        for (meth, typ), s in e.groupby(["method", "type"], sort=False):
            err = s.drop_duplicates(["seed", "layer"])["err"].median()
            lines.append(f"| {meth} | {typ} | {s['energy_init'].median():.2e} / {s['energy_init'].max():.2e} | "
                         f"{s['energy_final'].median():.2e} / {s['energy_final'].max():.2e} | {err:.4f} |")
    if "info.train_seconds" in df and df["info.train_seconds"].notna().any():
        dev = _device_names(df)
        lines += ["", "Block-training time per run (seconds, mean over seeds; GPU runs shared one GPU with other runs "
                  "(testbed_dllm: up to ~30, the others: 4-8), so only ratios between rows of one sweep on one device "
                  "mean anything; the ratio is against FlatQuant on the same device):", "",
                  "| method.label | device | train seconds | vs flatquant |", "|---|---|---|---|"]
        t = df["info.train_seconds"].groupby([df["method.label"], dev], sort=False).mean().dropna()
        for (k, d), v in t.items():
            ref = t.get(("flatquant", d))
            lines.append(f"| {k} | {d} | {v:.0f} | {v / ref:.2f}x |" if ref else f"| {k} | {d} | {v:.0f} | – |")
    return lines + [""]


def coverage(df: pd.DataFrame, testbed: str) -> tuple[list[str], tuple[int, int, int, int]] | None:
    """What the sweep of ``conf/experiment/repro_<testbed>.yaml`` asks for and the rows lack: Markdown lines and
    ``(runs present, runs asked, must-show present, must-show asked)``, the must-show runs being FlatQuant's and
    every FreeAct variant's (issue 12). None when the CSV is not one of the study's sweeps."""
    if not (jobs.ROOT / "conf" / "experiment" / f"repro_{testbed}.yaml").exists():
        return None
    methods, seeds = jobs.sweep(testbed)
    ok = df[df["status"] == "ok"] if "status" in df else df
    have = {(str(m), int(x)) for m, x in zip(ok["method.label"], ok["seed"])}
    asked = {m: [x for x in seeds if not (m in jobs.SEED_FREE and x != seeds[0])] for m in methods}
    missing = {m: [x for x in ss if (m, x) not in have] for m, ss in asked.items()}
    must = [m for m in methods if m == "flatquant" or m.startswith(("freeact", "flatquant_orth"))]
    n_asked = sum(len(ss) for ss in asked.values())
    n_have = n_asked - sum(len(ss) for ss in missing.values())
    m_asked = sum(len(asked[m]) for m in must)
    m_have = m_asked - sum(len(missing[m]) for m in must)
    gaps = [f"`{m}` ({', '.join(map(str, ss))})" for m, ss in missing.items() if ss]
    lines = [f"Coverage of the sweep (`conf/experiment/repro_{testbed}.yaml`, seeds {', '.join(map(str, seeds))}): "
             f"{n_have} of {n_asked} runs; FlatQuant and the FreeAct variants (what issue 12 must show) "
             f"{m_have} of {m_asked}." + (f" Missing (seeds): {'; '.join(gaps)}." if gaps else " Nothing missing."), ""]
    return lines, (n_have, n_asked, m_have, m_asked)


def _device_names(df: pd.DataFrame) -> pd.Series:
    """Each row's device (``device_name``, e.g. the GPU's name, else ``device``)."""
    names = df["device_name"] if "device_name" in df else pd.Series("unknown", index=df.index)
    if "device" in df:
        names = names.where(names.notna(), df["device"])
    return names.fillna("unknown").astype(str)


def _devices(df: pd.DataFrame) -> str:
    counts = _device_names(df).value_counts()
    return "devices: " + ", ".join(f"{d} ({n} rows)" for d, n in counts.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default=None, help="write Markdown here (default: print)")
    ap.add_argument("--allow-mixed", action="store_true", help="accept rows from several or dirty commits")
    ap.add_argument("--energy-dir", default=None, help="also write the per-layer energies as energy_<csv name>.csv here")
    args = ap.parse_args(argv)
    lines = ["# Reproduction study: generated numbers", "",
             "Generated by `python experiments/repro/report.py " + " ".join(args.csv) + "`; do not edit by hand.", ""]
    for p in args.csv:
        lines += section(p, args.allow_mixed, args.energy_dir)
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
