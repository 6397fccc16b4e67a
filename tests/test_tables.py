"""experiments/make_tables.py: Markdown + LaTeX from a results CSV, mean ± std over seeds, best in bold."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def test_tables_from_csv(tmp_path):
    rows = []
    for method, base in [("rtn", 10.0), ("quarot", 6.0), ("fp16", 5.0)]:
        for seed in (0, 1):
            rows.append({"run_hash": f"{method}{seed}", "status": "ok", "model.name": "m", "method.name": method,
                         "method.init": "random" if method == "quarot" else None,
                         "quant.name": "fp16" if method == "fp16" else "w4a4", "seed": seed,
                         "wiki.ppl": base + seed, "task.acc": 0.1 * base + seed})
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    out = tmp_path / "tables" / "t"
    res = subprocess.run([sys.executable, str(REPO / "experiments" / "make_tables.py"), str(tmp_path / "r.csv"),
                          "--rows", "model.name,method.name,method.init", "--metrics", "wiki.ppl", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    md = (out.parent / "t.md").read_text()
    assert "| m | quarot | random | **6.50 ± 0.71 (2)** | – |" in md  # lower perplexity is better: bold
    assert "| m | rtn | – | 10.50 ± 0.71 (2) | – |" in md
    tex = (out.parent / "t.tex").read_text()
    assert "\\textbf{6.50 $\\pm$ 0.71 (2)}" in tex and "\\begin{tabular}" in tex
    # methods x metrics layout: higher accuracy is better, and an average column
    res = subprocess.run([sys.executable, str(REPO / "experiments" / "make_tables.py"), str(tmp_path / "r.csv"),
                          "--cols", "metric", "--metrics", "task.acc,wiki.ppl"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "**1.50 ± 0.71 (2)**" in res.stdout  # rtn has the best accuracy
