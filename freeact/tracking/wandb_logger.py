"""Weights & Biases logging of a finished run (offline by default: no account needed)."""
from __future__ import annotations

from pathlib import Path


def log_to_wandb(row: dict, config: dict, logger_cfg, run_dir: str | Path) -> str | None:
    if logger_cfg.mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                     dir=str(run_dir), config=config, name=row.get("run_name"), reinit="finish_previous")
    run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    path = run.dir
    run.finish()
    return path
