"""The job list of a reproduction-study sweep, one ``python -m freeact.run`` override line per run, for
``experiments/repro/gpu_queue.sh`` (parallel processes on one GPU). Read from the sweeper parameters of
``conf/experiment/repro_<testbed>.yaml`` (its methods and seeds), seeds outermost so that a queue cut short
still holds whole seeds of every method; or, with ``--by-method``, all seeds of one method (on every testbed)
before the next method, in the order ``--methods`` gives, so that a queue cut short holds every seed of the
methods that matter most:

    python experiments/repro/jobs.py testbed_dream testbed_ar --results-dir /root/out > jobs.txt
    experiments/repro/gpu_queue.sh jobs.txt 4 /root/out/queue
    [--methods flatquant,freeact,freeact_flat_r0] [--seeds 0,1,2] [--by-method] [--skip-done results/repro]
    [--extra all_methods.layers_in_flight=30]

``--skip-done DIR`` leaves out the runs whose (method label, seed) already has a row in ``DIR/<testbed>.csv``:
the runner itself skips only a run with the same config hash, so a queue with ``--extra`` settings (which
change the hash but not the numbers, e.g. how many layers train at once) would otherwise redo finished runs.

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


def done_runs(done_dir: str | Path, testbed: str) -> set[tuple[str, int]]:
    """(method label, seed) of the rows with status ok in ``done_dir/<testbed>.csv`` (empty when absent)."""
    from freeact.tracking.results import read_rows

    df = read_rows(Path(done_dir) / f"{testbed}.csv")
    if df.empty:
        return set()
    if "status" in df:
        df = df[df["status"] == "ok"]
    return {(str(m), int(s)) for m, s in zip(df["method.label"], df["seed"])}


def job_lines(testbeds: list[str], results_dir: str, methods: list[str] | None = None,
              seeds: list[int] | None = None, by_method: bool = False, skip_done: str | None = None,
              extra: list[str] | None = None) -> list[str]:
    plans = {tb: sweep(tb) for tb in testbeds}
    done = {tb: done_runs(skip_done, tb) for tb in testbeds} if skip_done else {tb: set() for tb in testbeds}
    all_seeds = sorted({s for _, ss in plans.values() for s in ss} if seeds is None else set(seeds))
    jobs = [(seed, tb, m) for seed in all_seeds for tb, (ms, ss) in plans.items() for m in ms
            if (not methods or m in methods) and seed in ss and not (m in SEED_FREE and seed != ss[0])
            and (m, seed) not in done[tb]]
    if by_method:
        rank = {m: i for i, m in enumerate(methods or [])}
        order = {tb: i for i, tb in enumerate(testbeds)}
        jobs.sort(key=lambda j: (rank.get(j[2], len(rank)), j[2] if j[2] not in rank else "", order[j[1]], j[0]))
    tail = "".join(f" {e}" for e in extra or [])
    return [f"+experiment=repro_{tb} method={m} seed={seed} results_file={results_dir}/{tb}.csv{tail}"
            for seed, tb, m in jobs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("testbeds", nargs="+", help="testbed_dllm, testbed_dream, testbed_vlm, testbed_ar")
    p.add_argument("--results-dir", default="results/repro")
    p.add_argument("--methods", default=None, help="comma-separated subset of the sweep's methods")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the sweep's seeds")
    p.add_argument("--by-method", action="store_true", help="all seeds of a method together, in --methods order")
    p.add_argument("--skip-done", default=None, metavar="DIR",
                   help="leave out (method label, seed) pairs that have a row in DIR/<testbed>.csv")
    p.add_argument("--extra", action="append", default=[], metavar="OVERRIDE",
                   help="an override appended to every run (repeatable; no spaces inside)")
    a = p.parse_args(argv)
    if any(" " in e for e in a.extra):
        p.error("--extra overrides may not contain spaces (the queue splits its lines on them)")
    methods = a.methods.split(",") if a.methods else None
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    print("\n".join(job_lines(a.testbeds, a.results_dir, methods, seeds, a.by_method, a.skip_done, a.extra)))


if __name__ == "__main__":
    main()
