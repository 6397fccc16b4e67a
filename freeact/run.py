"""Hydra entry point: ``python -m freeact.run model=... method=... quant=w4a4 [--multirun ...]``."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # noqa: F401  (registers the schemas)
from .config import ConfigError, config_hash, validate


def method_names() -> list[str]:
    from .methods import method_names as names  # imports torch and transformers: only once needed

    return names()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        specs = validate(cfg, method_names)
    except ConfigError as e:
        print(f"freeact: invalid config: {e}", file=sys.stderr)
        sys.exit(2)

    from .experiment import run_experiment
    from .methods import get_method
    from .tracking.results import append_row, find_row, flatten

    if not get_method(cfg.method.name, {}).quantizes:  # record what really ran: nothing quantized
        cfg.quant.name = "fp16"
        for key in ("weight", "act", "kv"):
            cfg.quant[key].bits = 16
    results = to_absolute_path(cfg.results_file)
    run_hash = config_hash(cfg)
    if not cfg.force and find_row(results, run_hash) is not None:
        print(f"freeact: skipping {run_hash}: already in {results} (force=true reruns it)")
        return None
    row, model = run_experiment(cfg, specs, run_hash)
    row["run_dir"] = HydraConfig.get().runtime.output_dir
    if cfg.save_model:
        from .artifacts import save_quantized

        row["artifact"] = str(save_quantized(model, cfg, row["run_dir"]))
    if cfg.logger.wandb:
        from .tracking.wandb_logger import log_to_wandb

        row["wandb_dir"] = log_to_wandb(row, OmegaConf.to_container(cfg, resolve=True), cfg.logger, row["run_dir"])
    if not append_row(results, row, allow_duplicate=cfg.force):
        print(f"freeact: {run_hash} was written meanwhile by another job with the same config: row not duplicated")
    config_keys = set(flatten(cfg))
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k not in config_keys and isinstance(v, (int, float)) and not isinstance(v, bool)
             and not k.startswith("info.layer")}  # per-layer details stay in the row
    label = cfg.method.get("label", cfg.method.name)
    print(f"freeact: {cfg.model.name} {label} {cfg.quant.name} -> {shown}")
    return None


if __name__ == "__main__":
    main()
