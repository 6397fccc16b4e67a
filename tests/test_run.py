"""The Hydra runner: config validation, one row per run, determinism, sweeps that resume."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from freeact.config import ConfigError, config_hash
from freeact.validate import validate
from freeact.tracking.results import append_row, find_row, read_rows

REPO = Path(__file__).resolve().parent.parent
FAST = ["calib.nsamples=4", "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2", "eval.mc_num=2",
        "progress=false"]


def cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "freeact.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("quant.act.bits=1", "quant.act.bits=1 must be in 2..16"),
    ("quant.weight.bits=17", "quant.weight.bits=17 must be in 2..16"),
    ("quant.weight.granularity=group", None),  # 128 does not divide tiny widths -> caught below
    ("calib.nsamples=0", "calib.nsamples=0 must be > 0"),
    ("calib.source=/no/such/file.txt", "calib.source"),
    ("model.source=pretrained", "model.path must be set"),
    ("+model.path=/no/such/dir", None),
    ("method.weight_algo=bogus", "method.weight_algo='bogus'"),
    ("quant.act.granularity=diagonal", "quant.act.granularity='diagonal'"),
])
def test_bad_configs_fail_with_named_key(compose, override, message):
    overrides = [override]
    if override == "quant.weight.granularity=group":
        overrides.append("quant.weight.group_size=48")
        message = "quant.weight.group_size=48 does not divide the width 128"
    if override.startswith("+model.path"):
        overrides = ["model.source=pretrained", "model.path=/no/such/dir"]
        message = "model.path=/no/such/dir does not exist"
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value)


def test_good_config_validates_for_every_tiny_model(compose):
    for model in ["tiny_llama", "tiny_llada", "tiny_dream"]:
        specs = validate(compose([f"model={model}"]))
        assert specs["weight"].bits == 4 and specs["act"].bits == 4 and not specs["kv"].enabled


def test_config_hash_ignores_bookkeeping_but_not_settings(compose):
    a, b = compose([]), compose(["force=true", "progress=false", "tag=x"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose(["seed=1"]))
    assert config_hash(a) != config_hash(compose(["quant=w4a8"]))


def test_cli_bad_config_one_line_nonzero_no_row(tmp_path):
    res = cli(["quant.act.bits=1", f"results_file={tmp_path}/r.csv"], tmp_path)
    assert res.returncode != 0
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert err == ["freeact: invalid config: quant.act.bits=1 must be in 2..16 (16 = not quantized)"]
    assert not (tmp_path / "r.csv").exists()
    res = cli(["method=nonexistent", f"results_file={tmp_path}/r.csv"], tmp_path)
    assert res.returncode != 0 and "Could not find 'method/nonexistent'" in res.stderr
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("override", ["quant.act.bits=1", "calib.nsamples=0", "quant.weight.granularity=blocks"])
def test_cli_rejects_a_bad_value_before_loading_torch(tmp_path, override):
    """Fast failure: the config checks run before torch / transformers / lm-eval are imported."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "freeact.run", override,
                          f"results_file={tmp_path}/r.csv"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and f"freeact: invalid config: {override.split('=')[0]}" in res.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "freeact.config" in imported  # the import log is real: the check above can fail
    assert not imported & {"torch", "transformers", "lm_eval", "datasets"}


def test_cli_rows_deterministic_and_resumable(tmp_path):
    out = f"results_file={tmp_path}/r.csv"
    res = cli(["-m", "method=fp16,rtn", *FAST, out], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    df = read_rows(tmp_path / "r.csv")
    assert list(df["method.name"]) == ["fp16", "rtn"]
    fp, rtn = df["wiki.nll"]
    assert rtn != fp  # quantization changed the model (a random model has no quality to lose)
    for col in ["run_hash", "model.name", "quant.act.bits", "calib.nsamples", "wall_seconds", "peak_memory_mb",
                "torch", "transformers", "git_commit"]:
        assert col in df.columns, col
    # same config again: skipped, no new row
    res = cli(["method=rtn", *FAST, out], tmp_path)
    assert "skipping" in res.stdout and len(read_rows(tmp_path / "r.csv")) == 2
    # forced: recomputed, same numbers (deterministic)
    res = cli(["method=rtn", "force=true", *FAST, out], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    df = read_rows(tmp_path / "r.csv")
    assert len(df) == 3 and df["wiki.nll"].iloc[2] == df["wiki.nll"].iloc[1]


def test_append_is_atomic_and_handles_new_columns(tmp_path):
    p = tmp_path / "r.csv"
    append_row(p, {"run_hash": "a", "status": "ok", "x": 1})
    append_row(p, {"run_hash": "b", "status": "ok", "x": 2, "new": 3.5})
    df = pd.read_csv(p)
    assert list(df["run_hash"]) == ["a", "b"] and pd.isna(df["new"][0]) and df["new"][1] == 3.5
    assert find_row(p, "b")["x"] == 2 and find_row(p, "zzz") is None
    assert append_row(p, {"run_hash": "b", "status": "ok", "x": 99}) is False  # a parallel duplicate
    assert list(pd.read_csv(p)["x"]) == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_wandb_logger_writes_an_offline_run(tmp_path):
    res = cli(["model=tiny_llama", "logger=wandb", *FAST, f"results_file={tmp_path}/r.csv",
               f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert read_rows(tmp_path / "r.csv")["wandb_dir"].iloc[0].startswith(str(runs[0]))
