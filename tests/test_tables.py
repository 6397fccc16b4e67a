"""experiments/make_tables.py: Markdown + LaTeX from a results CSV, mean ± std over seeds, best in bold;
the commit under each table, refusals of mixed commits / dirty rows / non-seed averaging, paired differences."""
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "experiments" / "make_tables.py")
sys.path.insert(0, str(REPO / "experiments"))
import make_tables  # noqa: E402


def make_tables_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def row(method, seed, nll, commit="abc1234", model="m", **extra):
    return {"run_hash": f"{model}{method}{seed}", "status": "ok", "model.name": model, "method.name": method,
            "quant.name": "w4a4", "seed": seed, "wiki.nll": nll, "git_commit": commit, **extra}


def test_tables_from_csv(tmp_path):
    rows = []
    for method, base in [("rtn", 10.0), ("quarot", 6.0), ("fp16", 5.0)]:
        for seed in (0, 1):
            rows.append({"run_hash": f"{method}{seed}", "status": "ok", "model.name": "m", "method.name": method,
                         "method.init": "random" if method == "quarot" else None,
                         "quant.name": "fp16" if method == "fp16" else "w4a4", "seed": seed,
                         "wiki.ppl": base + seed, "task.acc": 0.1 * base + seed, "git_commit": "abc1234"})
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    out = tmp_path / "tables" / "t"
    res = make_tables_cli(tmp_path / "r.csv", "--rows", "model.name,method.name,method.init", "--metrics", "wiki.ppl",
                          "--out", out)
    assert res.returncode == 0, res.stderr
    md = (out.parent / "t.md").read_text()
    assert "| m | quarot | random | **6.50 ± 0.71 (2)** | – |" in md  # lower perplexity is better: bold
    assert "| m | rtn | – | 10.50 ± 0.71 (2) | – |" in md
    assert md.rstrip().endswith("rows from commit abc1234 (6 rows)")  # provenance under the table
    tex = (out.parent / "t.tex").read_text()
    assert "\\textbf{6.50 $\\pm$ 0.71 (2)}" in tex and "\\begin{tabular}" in tex
    assert tex.index("\\end{tabular}") < tex.index("rows from commit abc1234 (6 rows)")
    # methods x metrics layout: higher accuracy is better, and an average column
    res = make_tables_cli(tmp_path / "r.csv", "--cols", "metric", "--metrics", "task.acc,wiki.ppl")
    assert res.returncode == 0, res.stderr
    assert "**1.50 ± 0.71 (2)**" in res.stdout  # rtn has the best accuracy
    assert "rows from commit abc1234 (6 rows)" in res.stdout


def test_metrics_default_is_every_metric_found(tmp_path):
    rows = [row(m, s, 4.0 + s + k, **{"wiki.ppl": 50.0 + s + k, "task.acc": 0.5 + s / 10 - k / 10, "task.n": 500,
                                      "wiki.eval_tokens": 8192, "wall_seconds": 3.0 + s, "method.lr": 1e-3})
            for m, k in (("rtn", 1), ("flatquant", 0)) for s in (0, 1)]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    res = make_tables_cli(tmp_path / "r.csv", "--out", tmp_path / "t")
    assert res.returncode == 0, res.stderr
    titles = [line for line in res.stdout.splitlines() if line.startswith("metric: ")]
    assert titles == ["metric: wiki.nll", "metric: wiki.ppl", "metric: task.acc"]  # not counts, timings, config
    md = (tmp_path / "t.md").read_text()
    assert "| m | rtn | 51.50 ± 0.71 (2) |" in md and "| m | flatquant | **50.50 ± 0.71 (2)** |" in md
    assert "| m | rtn | 0.45 ± 0.07 (2) |" in md and "| m | flatquant | **0.55 ± 0.07 (2)** |" in md
    assert md.count("rows from commit abc1234 (4 rows)") == 3
    assert make_tables.metric_columns(pd.DataFrame(rows)) == ["wiki.nll", "wiki.ppl", "task.acc"]


@pytest.mark.parametrize("commit, why", [("def5678", "2 commits"), ("abc1234+dirty", "dirty tree"),
                                         (None, "unknown commit")])
def test_refuses_mixed_commits_and_dirty_rows(tmp_path, commit, why):
    rows = [row("rtn", 0, 5.0), row("rtn", 1, 5.2), row("flatquant", 0, 4.5), row("flatquant", 1, 4.7, commit=commit)]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    out = tmp_path / "tables" / "t"
    res = make_tables_cli(tmp_path / "r.csv", "--metrics", "wiki.nll", "--out", out)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and why in res.stderr and "--allow-mixed" in res.stderr
    assert res.stdout == "" and not out.parent.exists()  # nothing written

    res = make_tables_cli(tmp_path / "r.csv", "--metrics", "wiki.nll", "--out", out, "--allow-mixed")
    assert res.returncode == 0, res.stderr
    assert "| m | flatquant | **4.60 ± 0.14 (2)** |" in res.stdout  # still the seed mean
    md, tex = (out.parent / "t.md").read_text(), (out.parent / "t.tex").read_text()
    listed = commit or "unknown"
    assert f"rows from 2 commits: abc1234 (3 rows), {listed} (1 row)" in md
    assert f"rows from 2 commits: abc1234 (3 rows), {listed} (1 row)" in tex
    if commit == "def5678":  # clean commits: listed, not a draft
        assert "DRAFT" not in md and "DRAFT" not in tex
    else:
        assert "DRAFT: 1 of 4 rows from a dirty tree or an unknown commit" in md
        assert "\\textbf{DRAFT}: 1 of 4 rows" in tex


def test_averages_only_seeds(tmp_path):
    # issue 17: a row with an extra key (+quant.wbits=4, from before such keys were rejected) and the real
    # run, both seed 0: shown apart, never averaged
    rows = [row("rtn", 0, 5.0), row("rtn", 0, 5.2, **{"quant.wbits": 4}), row("flatquant", 0, 4.5)]
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    res = make_tables_cli(tmp_path / "a.csv", "--metrics", "wiki.nll", "--out", tmp_path / "a")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "a.md").read_text()
    assert "| m | rtn | – | 5.00 |" in md and "| m | rtn | 4.0 | 5.20 |" in md
    assert "5.10" not in md  # the mean of the two is nowhere
    assert "rows that differ in quant.wbits besides the seed are shown apart (not averaged)" in md

    # two learning rates in one cell (not in --rows): the seeds of each are averaged, the two lrs shown apart
    rows = [row("flatquant", 0, 4.5, **{"method.lr": 5e-3}), row("flatquant", 0, 4.6, **{"method.lr": 1e-3}),
            row("flatquant", 1, 4.7, **{"method.lr": 1e-3})]
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    for extra in ([], ["--rows", "model.name,method.name,method.lr"]):
        res = make_tables_cli(tmp_path / "b.csv", "--metrics", "wiki.nll", *extra)
        assert res.returncode == 0, res.stderr
        assert "| m | flatquant | 0.001 | 4.65 ± 0.07 (2) |" in res.stdout
        assert "| m | flatquant | 0.005 | **4.50** |" in res.stdout
        assert ("shown apart" in res.stdout) == (not extra)
    # --allow-mixed averages them anyway, and says so under the table
    res = make_tables_cli(tmp_path / "b.csv", "--metrics", "wiki.nll", "--allow-mixed")
    assert res.returncode == 0, res.stderr
    assert "| m | flatquant | 4.60 ± 0.10 (3) |" in res.stdout
    assert "cell m | flatquant | w4a4 averages 3 rows (seeds 0, 0, 1) that differ in method.lr" in res.stdout

    # the same config twice with one seed (e.g. force=true): duplicates, refused
    rows = [row("rtn", 0, 5.0), row("rtn", 0, 5.1), row("rtn", 1, 5.2)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    res = make_tables_cli(tmp_path / "d.csv", "--metrics", "wiki.nll")
    assert res.returncode == 2 and "repeated seeds (0, 0, 1)" in res.stderr and "duplicate" in res.stderr


def paired_rows():
    """3 seeds per method on model m; freeact = flatquant + (-0.10, -0.12, -0.14), quarot = flatquant +
    (-0.01, +0.02, -0.04); plus a freeact seed without a baseline, a baseline seed without others, and a
    second model whose baseline must not be used for m."""
    base = {0: 4.50, 1: 4.60, 2: 4.55, 4: 4.40}
    rows = [row("flatquant", s, v) for s, v in base.items()]
    rows += [row("freeact", s, base[s] + d) for s, d in zip((0, 1, 2), (-0.10, -0.12, -0.14))]
    rows += [row("freeact", 3, 1.0)]
    rows += [row("quarot", s, base[s] + d) for s, d in zip((0, 1, 2), (-0.01, 0.02, -0.04))]
    rows += [row("flatquant", s, 9.0, model="m2") for s in (0, 1, 2)]
    rows += [row("freeact", s, 9.0 + 0.5 * (s + 1), model="m2") for s in (0, 1, 2)]
    return rows


def test_paired_differences_hand_computed():
    assert make_tables.t_quantile_975(2) == pytest.approx(4.302653, abs=1e-6)
    df = pd.DataFrame(paired_rows())
    diff, used, problems = make_tables.paired_differences(df, ["model.name", "method.name"], "quant.name",
                                                          ["wiki.nll"], "method.name", "flatquant")
    assert problems == []
    fa = diff.loc[("m", "freeact", "w4a4", "wiki.nll")]
    half = 4.302653 * 0.02 / math.sqrt(3)  # differences -0.10, -0.12, -0.14: mean -0.12, sd 0.02
    assert fa["n"] == 3  # seed 3 (no baseline) and seed 4 (baseline only) are left out
    assert fa["mean"] == pytest.approx(-0.12, abs=1e-9)
    assert (fa["lo"], fa["hi"]) == (pytest.approx(-0.12 - half, abs=1e-6), pytest.approx(-0.12 + half, abs=1e-6))
    assert fa["lo"] == pytest.approx(-0.169683, abs=1e-6) and fa["hi"] == pytest.approx(-0.070317, abs=1e-6)
    qr = diff.loc[("m", "quarot", "w4a4", "wiki.nll")]
    half = 4.302653 * 0.03 / math.sqrt(3)  # differences -0.01, 0.02, -0.04: mean -0.01, sd 0.03
    assert qr["mean"] == pytest.approx(-0.01, abs=1e-9) and qr["n"] == 3
    assert qr["lo"] == pytest.approx(-0.01 - half, abs=1e-6) and qr["hi"] == pytest.approx(-0.01 + half, abs=1e-6)
    m2 = diff.loc[("m2", "freeact", "w4a4", "wiki.nll")]  # against m2's own baseline: 0.5, 1.0, 1.5
    half = 4.302653 * 0.5 / math.sqrt(3)  # 1.242069
    assert m2["mean"] == pytest.approx(1.0, abs=1e-9) and m2["hi"] == pytest.approx(1.0 + half, abs=1e-6)
    assert len(diff) == 3 and len(used) == 3 + 3 + 3 + 6  # rows with a matched seed; seeds 3, 4 unused


def test_paired_cli(tmp_path):
    pd.DataFrame(paired_rows()).to_csv(tmp_path / "r.csv", index=False)
    res = make_tables_cli(tmp_path / "r.csv", "--metrics", "wiki.nll", "--paired", "method.name=flatquant",
                          "--digits", "3", "--out", tmp_path / "t")
    assert res.returncode == 0, res.stderr
    md, tex = (tmp_path / "t.md").read_text(), (tmp_path / "t.tex").read_text()
    assert "difference vs flatquant (method.name=flatquant), per seed; negative = lower" in md
    assert "| m | freeact | w4a4 | wiki.nll | -0.1200 | [-0.1697, -0.0703] | 3 | yes: lower |" in md
    assert "| m | quarot | w4a4 | wiki.nll | -0.0100 | [-0.0845, +0.0645] | 3 | no |" in md
    assert "| m2 | freeact | w4a4 | wiki.nll | +1.0000 | [-0.2421, +2.2421] | 3 | no |" in md
    assert "[-0.1697, -0.0703]" in tex and "yes: lower" in tex
    assert md.rstrip().endswith("rows from commit abc1234 (15 rows)")
    # the baseline must be one config per seed, like every cell
    rows = paired_rows() + [row("flatquant", 0, 4.7, **{"method.lr": 1e-3})]
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    res = make_tables_cli(tmp_path / "b.csv", "--metrics", "wiki.nll", "--rows", "model.name,method.name,method.lr",
                          "--paired", "method.name=flatquant")
    assert res.returncode == 2 and "baseline method.name=flatquant in m | w4a4" in res.stderr
    assert "differ in method.lr" in res.stderr
    res = make_tables_cli(tmp_path / "r.csv", "--paired", "method.name=nosuch")
    assert res.returncode != 0 and "no row has method.name=nosuch" in res.stderr


def test_t_quantile_without_scipy(monkeypatch):
    from scipy.stats import t

    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import fails: the table / expansion is used
    for dof in (1, 2, 5, 29, 30, 31, 40, 100):
        assert make_tables.t_quantile_975(dof) == pytest.approx(float(t.ppf(0.975, dof)), abs=2e-5)
