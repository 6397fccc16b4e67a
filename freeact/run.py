"""Hydra entry point: ``python -m freeact.run model=... method=... quant=w4a4 [--multirun ...]``.

A run: validate every key (one line, exit 2, no run folder left) -> skip if its row exists -> compute
-> append the row to ``results_file`` (or, if that cannot be written any more, to ``row.json`` in the
run folder). Messages go to the terminal and to ``run.log`` in the run folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import urlparse

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # noqa: F401  (registers the schemas)
from .config import ConfigError, config_hash
from .validate import validate

log = logging.getLogger("freeact")


def hub_offline_without_network(timeout: float = 2.0) -> bool:
    """Without a network (a cluster node, an air-gapped machine) the hub client retries each request with
    back-off for ~25 s before failing; when the hub's host does not resolve, run offline (the local cache
    only) instead. Sets ``HF_HUB_OFFLINE=1`` before any hub library is imported; True if it did."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
            return False
        except (OSError, FutureTimeout):
            pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


def explicit_method_keys() -> set[str]:
    """``method.<key>`` settings given on the command line (or by a sweep): they win over ``all_methods``."""
    keys = set()
    for o in HydraConfig.get().overrides.task:
        lhs = o.split("=", 1)[0].lstrip("+~")
        if lhs.startswith("method."):
            keys.add(lhs[len("method."):].split(".", 1)[0])
    return keys


def remove_run_folder() -> None:
    """A rejected config leaves no run folder behind (nor the empty ``outputs/<date>`` above it)."""
    out = Path(HydraConfig.get().runtime.output_dir)
    logging.shutdown()  # closes run.log
    if not out.is_dir() or any(p.name not in (".hydra", "run.log") for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in (out.parent, out.parent.parent):
        try:
            if parent != Path.cwd() and parent.name not in ("", "."):
                parent.rmdir()  # only if empty
        except OSError:
            break


def save_row(results: str, row: dict, run_dir: str, force: bool, existed: bool = False) -> None:
    from .tracking.results import append_row

    try:
        written = append_row(results, row, allow_duplicate=force)
    except OSError as e:
        fallback = Path(run_dir) / "row.json"
        fallback.write_text(json.dumps(row, indent=1, default=str))
        log.error(f"freeact: cannot write {results} ({e.strerror or e}); the row is kept in {fallback} "
                  f"(append it with: python -m freeact.tracking.results {fallback} {results})")
        return
    if not written and not existed:
        log.info(f"freeact: {row['run_hash']} is already in {results} (written meanwhile by a job with the same "
                 "config): row not duplicated")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    logging.captureWarnings(True)
    hub_offline_without_network()
    try:
        specs = validate(cfg, explicit_method_keys())
    except ConfigError as e:
        print(f"freeact: invalid config: {e}", file=sys.stderr)
        remove_run_folder()
        sys.exit(2)
    try:
        return _run(cfg, specs)
    except KeyboardInterrupt:
        results = to_absolute_path(cfg.results_file)
        print(f"\nfreeact: interrupted; finished runs are in {results}; the same command resumes "
              "(runs already there are skipped)", file=sys.stderr)
        sys.exit(130)


def _run(cfg: DictConfig, specs: dict) -> None:
    from .experiment import run_experiment
    from .methods import get_method
    from .tracking.results import find_row, flatten

    quantizes = get_method(cfg.method.name, {}).quantizes
    if not quantizes:  # record what really ran: nothing quantized
        cfg.quant.name = "fp16"
        for key in ("weight", "act", "kv"):
            cfg.quant[key].bits = 16
    results = to_absolute_path(cfg.results_file)
    run_hash = config_hash(cfg)
    existed = not cfg.force and find_row(results, run_hash) is not None
    if existed:
        why = (f" ({cfg.method.name} quantizes nothing, so every bit setting is this same run)"
               if not quantizes else "")
        if not cfg.save_model:
            log.info(f"freeact: skipping {run_hash}: already in {results}{why} (force=true reruns it)")
            return None
        log.info(f"freeact: {run_hash} is already in {results}; computing it again to save the model "
                 "(the row there is kept)")
    row, model = run_experiment(cfg, specs, run_hash)
    row["run_dir"] = run_dir = HydraConfig.get().runtime.output_dir
    if cfg.save_model:
        from .artifacts import save_quantized

        row["artifact"] = str(save_quantized(model, cfg, run_dir))
    if cfg.logger.wandb:
        from .tracking.wandb_logger import log_to_wandb

        row["wandb_dir"] = log_to_wandb(row, OmegaConf.to_container(cfg, resolve=True), cfg.logger, run_dir)
    save_row(results, row, run_dir, cfg.force, existed)
    config_keys = set(flatten(cfg))
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k not in config_keys and isinstance(v, (int, float)) and not isinstance(v, bool)
             and not k.startswith("info.layer")}  # per-layer details stay in the row
    log.info(f"freeact: {cfg.model.name} {cfg.method.label} {cfg.quant.name} -> {shown}")
    return None


if __name__ == "__main__":
    main()
