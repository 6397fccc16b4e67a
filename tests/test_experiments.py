"""Every experiment file composes, and every run of its sweep gives a valid config."""
import itertools
from pathlib import Path

import pytest
import yaml

from freeact.config import validate
from freeact.methods import method_names

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
FULL_SIZE = {"llada_8b", "dream_7b", "llama2_7b", "qwen2_5_7b", "qwen2_5_vl_7b", "internvl2_5_8b"}


def sweep_overrides(name):
    spec = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()) or {}
    params = spec.get("hydra", {}).get("sweeper", {}).get("params", {})
    keys = list(params)
    values = [str(params[k]).split(",") if not str(params[k]).startswith("[") else [str(params[k])] for k in keys]
    for combo in itertools.product(*values):
        yield [f"{k}={v}" for k, v in zip(keys, combo)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweeps_compose_and_validate(compose, name):
    n = 0
    for overrides in sweep_overrides(name):
        cfg = compose([f"+experiment={name}", *overrides])
        n += 1
        if cfg.model.name in FULL_SIZE or cfg.model.name.startswith("testbed_ar"):
            continue  # needs the weights' config.json (network or a local copy) to check widths
        validate(cfg, method_names())
    assert n >= 1
