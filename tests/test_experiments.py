"""Every experiment file composes, and every run of its sweep gives a valid config."""
import itertools
from pathlib import Path

import pytest
import yaml
from conftest import missing, skip_reason

from freeact.validate import validate
from freeact.data.easy_vqa import is_easy_vqa

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


def optional_packages(cfg) -> list[str]:
    """The optional packages that validating this run's config needs (easy-VQA data: the real extra)."""
    return ["easy_vqa"] if any(is_easy_vqa(cfg[k].get("source", "")) for k in ("calib", "eval")) else []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweeps_compose_and_validate(compose, name):
    n, gone = 0, set()
    for overrides in sweep_overrides(name):
        cfg = compose([f"+experiment={name}", *overrides])
        n += 1
        if cfg.model.name in FULL_SIZE or cfg.model.name.startswith("testbed_ar"):
            continue  # needs the weights' config.json (network or a local copy) to check widths
        needs = missing(*optional_packages(cfg))
        if needs:  # not installed: the run still composed above, but cannot be validated
            gone.update(needs)
            continue
        validate(cfg)
    assert n >= 1
    if gone:  # every run composed; report the ones that could not be validated as a skip
        pytest.skip(skip_reason(sorted(gone)))
