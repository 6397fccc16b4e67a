"""The job list of a reproduction-study sweep, one ``python -m freeact.run`` override line per run, for
``experiments/repro/gpu_queue.sh`` (parallel processes on one GPU). Read from the sweeper parameters of
``conf/experiment/repro_<testbed>.yaml`` (its methods and seeds), seeds outermost so that a queue cut short
still holds whole seeds of every method:

    python experiments/repro/jobs.py testbed_dream testbed_ar --results-dir /root/out > jobs.txt
    experiments/repro/gpu_queue.sh jobs.txt 4 /root/out/queue
    [--methods flatquant,freeact,freeact_flat_r0] [--seeds 0,1,2]

Runs that need no calibration (``fp16``) are listed for the first seed only: their numbers do not depend on it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SEED_FREE = ("fp16",)


def sweep(testbed: str) -> tuple[list[str], list[int]]:
    """(methods, seeds) of ``conf/experiment/repro_<testbed>.yaml``."""
    path = ROOT / "conf" / "experiment" / f"repro_{testbed}.yaml"
    if not path.exists():
        raise SystemExit(f"no experiment {path.relative_to(ROOT)}")
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return str(params["method"]).split(","), [int(s) for s in str(params["seed"]).split(",")]


def job_lines(testbeds: list[str], results_dir: str, methods: list[str] | None = None,
              seeds: list[int] | None = None) -> list[str]:
    lines = []
    plans = {tb: sweep(tb) for tb in testbeds}
    all_seeds = sorted({s for _, ss in plans.values() for s in ss} if seeds is None else set(seeds))
    for seed in all_seeds:
        for tb, (ms, ss) in plans.items():
            for m in ms:
                if (methods and m not in methods) or seed not in ss or (m in SEED_FREE and seed != ss[0]):
                    continue
                lines.append(f"+experiment=repro_{tb} method={m} seed={seed} results_file={results_dir}/{tb}.csv")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("testbeds", nargs="+", help="testbed_dllm, testbed_dream, testbed_vlm, testbed_ar")
    p.add_argument("--results-dir", default="results/repro")
    p.add_argument("--methods", default=None, help="comma-separated subset of the sweep's methods")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the sweep's seeds")
    a = p.parse_args(argv)
    methods = a.methods.split(",") if a.methods else None
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    print("\n".join(job_lines(a.testbeds, a.results_dir, methods, seeds)))


if __name__ == "__main__":
    main()
