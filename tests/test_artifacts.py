"""A saved quantized run rebuilds to the same model and the same metrics."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

import freeact
from freeact.eval import evaluate_text
from freeact.models import get_adapter

REPO = Path(__file__).resolve().parent.parent


def test_saved_run_reloads_with_identical_metrics(tmp_path):
    args = ["model=tiny_dream", "method=gptq", "quant=w4a4kv4", "save_model=true", "calib.nsamples=4",
            "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2", "eval.mc_num=2", "progress=false",
            f"results_file={tmp_path}/r.csv", f"hydra.run.dir={tmp_path}/run"]
    res = subprocess.run([sys.executable, "-m", "freeact.run", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    row = pd.read_csv(tmp_path / "r.csv").iloc[0]
    model, tok, cfg = freeact.load_quantized(tmp_path / "run")
    assert model.config._attn_implementation == "freeact"  # the KV-quant hook came back
    assert len([m for m in model.modules() if type(m).__name__ == "InputQuantizer"]) == 2 * 7
    metrics = evaluate_text(model, get_adapter(model), tok, cfg.eval, progress=False)
    assert metrics["wiki.nll"] == row["wiki.nll"]
    # and the reloaded model is really quantized: different from the freshly built base model
    from freeact.experiment import load_model

    base, _ = load_model(OmegaConf.create(cfg.model), "cpu", seed=cfg.seed)
    ids = torch.randint(2, 4096, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, model(input_ids=ids).logits)
