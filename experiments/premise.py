"""FreeAct's premise, measured (issue 12, item 4): per layer, site and token type of one model, the
statistics of :func:`freeact.analysis.premise_stats` (effective ranks, the least other-type energy an
``r = d/32`` unique block can have, principal angles between the types' top subspaces), on the
full-precision model and the calibration set the pipeline builds from the same Hydra config.

Writes ``<out>/premise_<model>.csv``; with ``--runs CSV`` (result rows of ``python -m freeact.run``)
also ``<out>/energy_<model>.csv``: the per-layer energies / per-type errors those FreeAct runs logged
(:func:`freeact.analysis.logged_energies`), restricted to this model.

    python experiments/premise.py model=testbed_dllm calib.nsamples=128 calib.seqlen=512 seed=0 --types mask,unmasked
    python experiments/premise.py model=testbed_vlm calib=mm_easyvqa calib.nsamples=64 --types vision,text
    python experiments/premise.py model=testbed_ar calib.nsamples=32 calib.seqlen=512 --types text
    [--runs results/repro/x.csv] [--device cpu|cuda] [--out results/repro] [--rank-ratio 0.03125]

``--types`` defaults to ``mask,unmasked`` for a masked-diffusion model, ``vision,text`` for a VLM
calibrated on image-text data, else ``text`` (one type: effective ranks only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

import freeact.config  # noqa: E402,F401  (registers the config schemas)
from freeact.analysis import logged_energies, premise_stats  # noqa: E402
from freeact.experiment import calib_set, git_commit, is_multimodal, load_model  # noqa: E402
from freeact.models import get_adapter  # noqa: E402
from freeact.models.token_types import TokenTypes, rules_from_names  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, e.g. model=testbed_dream")
    p.add_argument("--types", default=None, help="comma-separated token-type names (default: by model, see above)")
    p.add_argument("--runs", default=None, help="result CSV of FreeAct runs: also write energy_<model>.csv")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=str(ROOT / "results" / "repro"))
    p.add_argument("--rank-ratio", type=float, default=1 / 32, help="r = round(d * ratio) for the 'room' column")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build(cfg, device: str):
    """Model, adapter and calibration set, as :func:`freeact.experiment.run_experiment` makes them."""
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, device, seed=cfg.seed)
    adapter = get_adapter(model)
    return model, adapter, calib_set(cfg, tok, adapter)


def default_types(adapter, cfg) -> list[str]:
    if adapter.objective == "mdm":
        return ["mask", "unmasked"]
    if is_multimodal(cfg.calib) and "vision" in adapter.token_type_ids():
        return ["vision", "text"]
    return ["text"]


def main(argv=None) -> dict:
    a = parse_args(argv)
    cfg = compose_cfg(a.overrides)
    t0, commit = time.time(), git_commit()
    model, adapter, calib = build(cfg, a.device)
    batches = list(calib.batches(cfg.calib.batch_size))
    names = a.types.split(",") if a.types else default_types(adapter, cfg)
    tt = TokenTypes(rules_from_names(adapter, names))
    t_load = time.time() - t0
    df = premise_stats(model, adapter, batches, tt, device=a.device, rank_ratio=a.rank_ratio,
                       progress=not a.no_progress)
    seconds = time.time() - t0
    meta = {"model": cfg.model.name, "calib": cfg.calib.name, "nsamples": cfg.calib.nsamples,
            "seqlen": None if is_multimodal(cfg.calib) else cfg.calib.seqlen, "seed": cfg.seed,
            "git_commit": commit, "device": a.device}
    df = df.assign(**meta)[list(meta) + list(df.columns)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"premise_{cfg.model.name}.csv"
    df.to_csv(path, index=False)
    print(f"{path}: {len(df)} rows, types {names}, {seconds:.0f} s (load + calibration set {t_load:.0f} s)")
    summary(df)
    written = {"premise": path}
    if a.runs:
        energy = logged_energies(a.runs)
        energy = energy[energy.model == cfg.model.name]
        epath = out / f"energy_{cfg.model.name}.csv"
        energy.to_csv(epath, index=False)
        print(f"{epath}: {len(energy)} rows from {a.runs}")
        written["energy"] = epath
    return written


def summary(df) -> None:
    """Per site and type: medians over layers (and the range of eff_rank99 / d)."""
    df = df.assign(rank99_frac=df.eff_rank99 / df.d)
    g = df.groupby(["site", "type"], sort=False)
    s = g.agg(tokens=("tokens", "first"), share=("energy_share", "median"), rank99_frac_min=("rank99_frac", "min"),
              rank99_frac_med=("rank99_frac", "median"), rank99_frac_max=("rank99_frac", "max"),
              room_med=("room", "median"), room_min=("room", "min"), cos_mean_med=("angle_cos_mean", "median"),
              cos_min_med=("angle_cos_min", "median"))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(s.round(4).to_string())


if __name__ == "__main__":
    main()
