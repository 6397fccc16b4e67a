"""Result rows: one CSV row per run, appended atomically, and looked up for resuming sweeps.

The CSV is rewritten through a temporary file and ``os.replace`` under an exclusive file lock,
so a run killed at any moment leaves either the old file or the new one, never half a row, and
parallel runs (joblib / SLURM array jobs on a shared disk) do not interleave.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = {}
    for k, v in c.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else str(v)
    return out


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    p = Path(path)
    return pd.read_csv(p) if p.exists() and p.stat().st_size else pd.DataFrame()


def append_row(path: str | os.PathLike, row: dict) -> None:
    p = Path(path)
    with _locked(p):
        df = pd.concat([read_rows(p), pd.DataFrame([row])], ignore_index=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                df.to_csv(f, index=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def find_row(path: str | os.PathLike, run_hash: str) -> dict | None:
    df = read_rows(path)
    if df.empty or "run_hash" not in df:
        return None
    hit = df[(df["run_hash"] == run_hash) & (df.get("status", "ok") == "ok")]
    return None if hit.empty else hit.iloc[-1].to_dict()
