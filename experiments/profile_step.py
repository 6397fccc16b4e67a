"""Where a block-wise training step spends its time: one configuration of ``python -m freeact.run``
(any model, method and overrides), cut to its first ``--layers`` decoder layers, calibrated once with
``--epochs`` epochs; prints the mean step time (training seconds / steps: forward, loss, backward,
update), whether the steps were replayed from a CUDA graph (``method.cuda_graph``), the host
synchronisations per eager step (``--sync-debug``, CUDA), the operators and device kernels one eager
step launches and the operators that take the most time (``torch.profiler`` over ``--profile-steps``
eager steps of the last layer; a replayed graph runs no Python, so there is nothing to profile).

    python experiments/profile_step.py +experiment=repro_testbed_dream method=freeact [--layers 1]
        [--epochs 1] [--profile-steps 10] [--sync-debug] [--device cuda] [--out results/perf_logs/x.txt]

The counts tell whether a step is bound by launches (many small operators) or by arithmetic.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from omegaconf import OmegaConf
from premise import build, compose_cfg

from freeact.experiment import git_commit
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.models.loading import pick_device
from freeact.validate import validate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m freeact.run")
    p.add_argument("--layers", type=int, default=1, help="decoder layers kept (the first k)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--profile-steps", type=int, default=10, help="steps of the last layer under the profiler (0: none)")
    p.add_argument("--device", default=None, help="default: the config's device")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--sync-debug", action="store_true", help="count host synchronisations (CUDA)")
    p.add_argument("--out", default=None, help="also write the report here")
    return p.parse_args(argv)


def keep_layers(model, adapter, k: int) -> None:
    layers = adapter.layers()
    if not 1 <= k <= len(layers):
        raise SystemExit(f"--layers must be in 1..{len(layers)}, got {k}")
    del layers[k:]
    cfg = getattr(model.config, "text_config", None) or model.config
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:k]


class StepTimes:
    """Wall time between optimizer steps (device synced), and a profiler over a window of steps."""

    def __init__(self, device: str, profile_from: int, profile_steps: int):
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []
        self.profile_from, self.profile_steps, self.prof = profile_from, profile_steps, None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, *_):
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return  # the step being captured into a CUDA graph: no synchronising, no clock
        self._sync()
        self.times.append(time.perf_counter())
        n = len(self.times)
        if self.profile_steps and n == self.profile_from:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif self.prof is not None and n == self.profile_from + self.profile_steps:
            self.prof.__exit__(None, None, None)

    def median(self) -> float:
        d = [b - a for a, b in zip(self.times[:-1], self.times[1:])]
        return statistics.median(d) if d else float("nan")


def main(argv=None) -> str:
    a = parse_args(argv)
    cfg = compose_cfg(a.overrides + [f"++method.epochs={a.epochs}"])
    explicit = {o.split("=", 1)[0].lstrip("+").removeprefix("method.") for o in a.overrides
                if o.lstrip("+").startswith("method.")} | {"epochs"}
    specs = validate(cfg, explicit)
    device = pick_device(a.device or cfg.device)
    model, adapter, calib = build(cfg, device)
    keep_layers(model, adapter, a.layers)
    steps_per_layer = a.epochs * -(-cfg.calib.nsamples // cfg.calib.batch_size)
    clock = StepTimes(device, profile_from=(a.layers - 1) * steps_per_layer + 2, profile_steps=a.profile_steps)
    method = get_method(cfg.method.name, OmegaConf.to_container(cfg.method))
    ctx = QuantContext(model, adapter, QuantSettings(**specs), calib, device=device, batch_size=cfg.calib.batch_size,
                       seed=cfg.seed, progress=False)
    h = register_optimizer_step_post_hook(clock)
    syncs = []
    if a.sync_debug and device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = method.apply(ctx)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    finally:
        h.remove()
        if a.sync_debug and device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode(0)
    total = time.perf_counter() - t0
    steps = info.get("train_steps") or 0
    lines = [(f"{cfg.model.name} {cfg.method.label} amp={cfg.method.get('amp')} layers={a.layers} "
             f"epochs={a.epochs} steps={len(clock.times)} device={device} "
             f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}) torch {torch.__version__} "
             f"commit {git_commit()}"),
             f"apply {total:.1f} s, train {info.get('train_seconds')} s for {steps} steps: "
             f"{1e3 * info.get('train_seconds', 0) / max(steps, 1):.2f} ms per step (the whole layer loop); "
             f"cuda_graph: {info.get('cuda_graph')}; median eager step (optimizer hook) {clock.median() * 1e3:.2f} ms"]
    if a.sync_debug:
        lines.append(f"host synchronisations: {len(syncs)} in {steps} steps; "
                     f"kinds: {sorted(set(syncs))[:5]}")
    if clock.prof is not None:
        n = a.profile_steps
        ev = clock.prof.key_averages()
        kernels = sum(e.count for e in clock.prof.events() if e.device_type.name == "CUDA")
        top_level = sum(1 for e in clock.prof.events() if e.key.startswith("aten::") and e.cpu_parent is None)
        lines.append(f"per step: {top_level / n:.0f} top-level aten operators, {kernels / n:.0f} device kernels")
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        lines.append(ev.table(sort_by=sort, row_limit=a.top, max_name_column_width=60))
    report = "\n".join(lines)
    print(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
