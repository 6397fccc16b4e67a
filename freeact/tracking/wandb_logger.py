"""Weights & Biases logging of a finished run (offline by default: no account needed)."""
from __future__ import annotations

from pathlib import Path

from .results import flatten


def log_to_wandb(row: dict, config: dict, logger_cfg, run_dir: str | Path) -> str | None:
    if logger_cfg.mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                     dir=str(run_dir), config=config, name=row.get("run_name"), reinit="finish_previous")
    # one run = one row: its config goes to ``config`` (above), what it measured to ``summary`` only, so the
    # W&B UI shows no one-point history charts of constants
    config_keys = set(flatten(config))
    run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float, str)) and k not in config_keys})
    path = run.dir
    run.finish()
    return path
