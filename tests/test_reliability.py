"""Issue 17: every bad value rejected before compute (one line, exit 2, no row, no run folder, fast), a
finished row never lost, typed method settings, experiment-wide settings only where a method has them."""
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from freeact.config import ConfigError, config_hash
from freeact.validate import validate
from freeact.config.methods import (FAMILY_TYPE_NAMES, SETTINGS, FreeActSettings, SettingsError, apply_all_methods,
                                     parse_settings)
from freeact.tracking.results import append_row, read_rows

REPO = Path(__file__).resolve().parent.parent
FAST = ["calib.nsamples=4", "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2", "eval.mc_num=2",
        "progress=false", "model.arch.num_hidden_layers=1"]


def run_cli(args, cwd, code=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "freeact.run", *args] if code is None else [sys.executable, "-c", code, *args]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return res, time.time() - t0


@pytest.mark.parametrize("override,message", [
    ("seed=abc", "seed='abc' must be an integer"),
    ("device=gpu", "device='gpu' must be auto, cpu, cuda or cuda:N"),
    ("method=freeact method.rank_ratio=2", "method.rank_ratio=2.0 must be in [0, 1]"),
    ("method=flatquant method.epochs=-1", "method.epochs=-1 must be >= 0"),
    ("method=freeact method.token_types=[foo,bar]", "method.token_types=['foo', 'bar']: model family 'llada'"),
    ("results_file=/proc/nope/runs.csv", "results_file=/proc/nope/runs.csv cannot be written"),
    ("+quant.wbits=4", "quant.wbits is not a setting"),
    ("+foo=1", "foo is not a setting"),
    ("method=flatquant +method.epocs=15", "method.epocs is not a setting of flatquant (did you mean method.epochs?)"),
    ("++method.epochs=15", "method.epochs is not a setting of rtn"),
    ("method=freeact method.amp=fp8", "method.amp='fp8' must be one of"),
    ("method=flatquant method.cuda_graph=true device=cpu", "method.cuda_graph=true needs a CUDA device"),
    ("eval.kernels=fast", "eval.kernels='fast' must be one of ('eager', 'auto', 'triton')"),
    ("eval.kernels=triton device=cpu", "eval.kernels=triton needs Triton and a CUDA device (device=cpu)"),
    ("eval.cuda_graph=true device=cpu", "eval.cuda_graph=true replays CUDA graphs: it needs device=cuda (device=cpu)"),
    ("eval=text +eval.tasks=[freeact_mc]", "eval.tasks is not a setting of a text evaluation; eval=harness and eval=lmms have it"),
    ("model=llada_8b", "model.path=GSAI-ML/LLaDA-8B-Instruct is not in the Hugging Face cache"),
    ("method=gptq calib.batch_size=0", "calib.batch_size=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("model=tiny_llama model.arch.hidden_size=-4", "model.arch.hidden_size=-4 must be >= 0"),
    ("model=tiny_vlm model.arch.vision_config.depth=0", "model.arch.vision_config.depth=0 must be > 0"),
    ("model=tiny_llama model.arch.num_hidden_layers=0", "model.arch.num_hidden_layers=0 must be > 0"),
    ("method=spinquant method.momentum=-1", "method.momentum=-1.0 must be in [0, 1)"),
    ("method=spinquant method.load_rotations=/nope/r.pt", "method.load_rotations=/nope/r.pt does not exist"),
    ("method=spinquant method.save_rotations=/proc/nope/r.pt", "method.save_rotations=/proc/nope/r.pt cannot be written"),
    ("eval.max_chunks=-1", "eval.max_chunks=-1 must be >= 1 (null: every chunk)"),
    ("model=tiny_vlm eval=mm_easyvqa eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
    ("model=tiny_vlm eval=mm_easyvqa eval.nsamples=0", "eval.nsamples=0 must be >= 1 (null: every record)"),
])
def test_bad_value_one_line_exit_2_no_row_no_run_folder(tmp_path, override, message):
    results = tmp_path / "res" / "runs.csv"
    args = [*override.split(), f"results_file={results}" if "results_file" not in override else "seed=0",
            f"hydra.run.dir={tmp_path}/out/run"]
    res, seconds = run_cli(args, tmp_path)
    err = res.stderr.strip()
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(err.splitlines()) == 1 and err.startswith("freeact: invalid config: ") and message in err, err
    assert not results.exists() and not (tmp_path / "res").exists()
    assert not (tmp_path / "out").exists()  # no run folder (nor the folder above it) left behind
    assert seconds < 3 or override.startswith(("device", "model")), seconds  # cheap checks: before torch loads


def test_device_must_exist(compose):
    cfg = compose(["device=cuda:7"])
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(ConfigError, match="device=cuda:7"):
        validate(cfg)


def test_row_kept_when_the_results_file_cannot_be_written_at_the_end(tmp_path):
    # the results file is fine at validation; appending fails when the run ends (a full disk, simulated)
    code = ("import errno, sys; import freeact.tracking.results as r\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "r.append_row = full\n"
            "import runpy; sys.argv = ['freeact.run'] + sys.argv[1:]\n"
            "runpy.run_module('freeact.run', run_name='__main__', alter_sys=True)\n")
    results = tmp_path / "runs.csv"
    res, _ = run_cli([*FAST, f"results_file={results}", f"hydra.run.dir={tmp_path}/run"], tmp_path, code=code)
    assert res.returncode == 0, res.stderr
    assert "No space left on device" in res.stdout and "row.json" in res.stdout
    row = json.loads((tmp_path / "run" / "row.json").read_text())
    assert row["status"] == "ok" and row["wiki.nll"] > 0 and row["run_dir"] == str(tmp_path / "run")
    # and it can be appended later, as the message says
    subprocess.run([sys.executable, "-m", "freeact.tracking.results", str(tmp_path / "run" / "row.json"),
                    str(results)], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert read_rows(results)["run_hash"].tolist() == [row["run_hash"]]
    assert "freeact: tiny_llada rtn w4a4" in (tmp_path / "run" / "run.log").read_text()  # the run's log


def test_ctrl_c_ends_with_one_line_and_no_row(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "freeact.run", "method=flatquant", "method.epochs=10000", *FAST,
                          f"results_file={tmp_path}/r.csv", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # loading, calibration, then training for much longer than this
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert err.strip().splitlines()[-1].startswith("freeact: interrupted; finished runs are in ")
    assert "Traceback" not in err and not (tmp_path / "r.csv").exists()


def test_results_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        append_row(tmp_path / "r.csv", {"run_hash": "a", "x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.csv").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- typed method settings
def test_every_registered_method_has_a_schema_and_its_yaml_only_overrides():
    from freeact.methods import method_names

    assert method_names() == sorted(SETTINGS)
    for name, cls in SETTINGS.items():
        cfg = OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml")
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        repeated = [k for k, v in cfg.items() if k not in ("defaults", "name", "label") and defaults.get(k) == v]
        assert not repeated, f"conf/method/{name}.yaml repeats the defaults of {repeated}"


def test_settings_types_ranges_and_unknown_keys():
    s = parse_settings({"name": "flatquant", "epochs": 3, "lr": 1})
    assert s.epochs == 3 and s.lr == 1.0 and isinstance(s.lr, float) and s.matrix == "invertible"
    for raw, msg in [({"name": "flatquant", "epochs": 2.5}, "method.epochs=2.5 must be an integer"),
                     ({"name": "flatquant", "lwc": "yes"}, "method.lwc='yes' must be true or false"),
                     ({"name": "flatquant", "kv_transform": "sometimes"}, "method.kv_transform='sometimes' must be auto"),
                     ({"name": "quarot", "act_clip_ratio": 0}, "method.act_clip_ratio=0.0 must be in (0, 1]"),
                     ({"name": "freeact", "matrix": "invertible"}, "must be orthogonal"),
                     ({"name": "rtn", "epochs": 1}, "method.epochs is not a setting of rtn"),
                     ({"name": "nosuch"}, "method.name='nosuch' is not one of")]:
        with pytest.raises(SettingsError, match=None) as e:
            parse_settings(raw)
        assert msg in str(e.value), (raw, str(e.value))


def test_token_type_names_agree_with_the_adapters(tiny_model):
    from freeact.models import get_adapter

    for family in ("llada", "dream", "causal"):
        kind = {"causal": "llama"}.get(family, family)
        assert tuple(get_adapter(tiny_model(kind)).token_type_ids()) == FAMILY_TYPE_NAMES[family]
    FreeActSettings(token_types=["vision", "text"]).check_token_types("vlm")
    with pytest.raises(SettingsError, match="exactly one other name"):
        FreeActSettings(token_types=["mask", "unmasked"]).check_token_types("vlm")


def test_all_methods_goes_only_where_a_method_has_the_key(compose):
    shared = {"epochs": 15, "steps": 100}
    assert apply_all_methods({"name": "rtn"}, shared) == {"name": "rtn"}
    assert apply_all_methods({"name": "flatquant", "epochs": 1}, shared) == {"name": "flatquant", "epochs": 15}
    assert apply_all_methods({"name": "spinquant"}, shared) == {"name": "spinquant", "steps": 100}
    # a key given on the command line wins over all_methods
    assert apply_all_methods({"name": "flatquant", "epochs": 3}, shared, {"epochs"})["epochs"] == 3
    with pytest.raises(SettingsError, match="all_methods.epocs is a setting of no method"):
        apply_all_methods({"name": "rtn"}, {"epocs": 1})
    # composed: the rows record what ran, and nothing of all_methods itself
    rtn = compose(["model=testbed_dllm", "+experiment=repro_testbed_dllm", "method=rtn"])
    flat = compose(["model=testbed_dllm", "+experiment=repro_testbed_dllm", "method=flatquant"])
    validate(rtn)
    validate(flat)
    assert "epochs" not in rtn.method and "all_methods" not in rtn and flat.method.epochs == 15
    assert flat.method.amp == "off" and flat.method.label == "flatquant"  # the study trains in float32
    # RTN's identity does not depend on an epochs setting it does not have
    rtn5 = compose(["model=testbed_dllm", "+experiment=repro_testbed_dllm", "method=rtn", "++all_methods.epochs=5"])
    validate(rtn5)
    assert config_hash(rtn) == config_hash(rtn5)


def test_save_model_on_an_existing_row_computes_again_and_reloads_to_the_same_metrics(tmp_path):
    args = ["method=flatquant", "save_model=true", *FAST, f"results_file={tmp_path}/r.csv"]
    for run in ("a", "b"):
        res, _ = run_cli([*args, f"hydra.run.dir={tmp_path}/{run}"], tmp_path)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / run / "quantized.safetensors").exists() and (tmp_path / run / "quantized.json").exists()
    assert "computing it again to save the model" in res.stdout
    rows = read_rows(tmp_path / "r.csv")
    assert len(rows) == 1
    import freeact
    from freeact.eval import evaluate
    from freeact.models import get_adapter

    model, tok, cfg = freeact.load_quantized(tmp_path / "b")
    metrics = evaluate(model, get_adapter(model), tok, cfg.eval, device="cpu", progress=False)
    assert metrics["wiki.nll"] == pytest.approx(rows["wiki.nll"].iloc[0], rel=1e-9)


def test_eval_through_the_fused_pipelines_gives_the_eager_metrics_and_saves_the_plain_model(tmp_path):
    """eval.kernels=auto on a CPU: the input pipelines are swapped for the fused ones (eager math here) while
    the model is evaluated (the row counts them), the metrics are eager's, and the saved model, which holds
    the original pipelines again, reloads to the same metrics."""
    base = ["method=flatquant", *FAST, f"results_file={tmp_path}/r.csv"]
    for run, extra in (("eager", []), ("fused", ["eval.kernels=auto", "save_model=true"])):
        res, _ = run_cli([*base, *extra, f"hydra.run.dir={tmp_path}/{run}"], tmp_path)
        assert res.returncode == 0, res.stderr
    rows = read_rows(tmp_path / "r.csv").set_index("eval.kernels")
    assert rows.loc["auto", "info.fused_input_quantizers"] == 7  # the one layer's seven linears
    assert rows.loc["auto", "wiki.nll"] == rows.loc["eager", "wiki.nll"]
    import freeact
    from freeact.eval import evaluate
    from freeact.kernels import FusedInputQuantizer
    from freeact.models import get_adapter

    model, tok, cfg = freeact.load_quantized(tmp_path / "fused")
    assert not any(isinstance(m, FusedInputQuantizer) for m in model.modules())
    metrics = evaluate(model, get_adapter(model), tok, cfg.eval, device="cpu", progress=False)
    assert metrics["wiki.nll"] == pytest.approx(rows.loc["auto", "wiki.nll"], rel=1e-9)
