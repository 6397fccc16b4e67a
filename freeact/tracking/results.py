"""Result rows: one CSV row per run, appended atomically, and looked up for resuming sweeps.

The CSV is rewritten through a temporary file and ``os.replace`` under an exclusive file lock,
so a run killed at any moment leaves either the old file or the new one, never half a row, and
parallel runs (joblib / SLURM array jobs on a shared disk) do not interleave.
"""
from __future__ import annotations

import fcntl
import json
import sys
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
    # hashes as text: "9201e81" would otherwise be read as the number 9.201e84
    if not (p.exists() and p.stat().st_size):
        return pd.DataFrame()
    return pd.read_csv(p, dtype={"git_commit": str, "run_hash": str})


def append_row(path: str | os.PathLike, row: dict, allow_duplicate: bool = False) -> bool:
    """Append ``row``; False (nothing written) if a finished row with the same ``run_hash`` is there
    already (e.g. written by a parallel job that ran the same config), unless ``allow_duplicate``
    (a forced rerun)."""
    p = Path(path)
    with _locked(p):
        old = read_rows(p)
        if not allow_duplicate and "run_hash" in row and _has_ok_row(old, row["run_hash"]):
            return False
        df = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a shared results file follows the umask
            with os.fdopen(fd, "w") as f:
                df.to_csv(f, index=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _has_ok_row(df: pd.DataFrame, run_hash: str) -> bool:
    if df.empty or "run_hash" not in df:
        return False
    return bool(((df["run_hash"] == run_hash) & (df.get("status", "ok") == "ok")).any())


def find_row(path: str | os.PathLike, run_hash: str) -> dict | None:
    df = read_rows(path)
    if not _has_ok_row(df, run_hash):
        return None
    return df[df["run_hash"] == run_hash].iloc[-1].to_dict()


def main(argv: list[str] | None = None) -> None:
    """``python -m freeact.tracking.results ROW_JSON RESULTS_CSV``: append a row a run had to keep in its
    run folder (``row.json``: the results file could not be written then)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m freeact.tracking.results ROW_JSON RESULTS_CSV")
    row = json.loads(Path(args[0]).read_text())
    print("appended" if append_row(args[1], row) else f"not appended: {row.get('run_hash')} is already in {args[1]}")


if __name__ == "__main__":
    main()
