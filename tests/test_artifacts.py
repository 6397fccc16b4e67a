"""A saved quantized run rebuilds to the same model and the same metrics."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
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
    # every linear of the 2 layers has its input pipeline back; q/k/v and gate/up share theirs, as saved
    iqs = {n: lin.input_quantizer for n, lin in model.named_modules() if hasattr(lin, "input_quantizer")}
    assert len(iqs) == 2 * 7 and len({id(m) for m in iqs.values()}) == 2 * 4
    assert iqs["model.layers.0.self_attn.q_proj"] is iqs["model.layers.0.self_attn.v_proj"]
    assert iqs["model.layers.0.self_attn.q_proj"].consumers == 3
    metrics = evaluate_text(model, get_adapter(model), tok, cfg.eval, progress=False)
    assert metrics["wiki.nll"] == row["wiki.nll"]
    # and the reloaded model is really quantized: different from the freshly built base model
    from freeact.experiment import load_model

    base, _ = load_model(OmegaConf.create(cfg.model), "cpu", seed=cfg.seed)
    ids = torch.randint(2, 4096, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("method,cfg", [("quarot", {}), ("flatquant", {"epochs": 1}), ("freeact", {"epochs": 1}),
                                        ("freeact", {"epochs": 0, "typed_basis": "dense", "matrix": "invertible",
                                                     "init": "spectral"})])
def test_every_transform_round_trips_through_safetensors_and_json(tmp_path, tokenizer, method, cfg):
    from freeact.artifacts import DESCRIPTION, TENSORS, load_quantized, save_quantized
    from freeact.data.calib import build_calib_set
    from freeact.methods import QuantContext, QuantSettings, get_method
    from freeact.models.loading import load_model
    from freeact.quant.quantizer import QuantSpec

    conf = OmegaConf.create({"model": {"name": "t", "family": "llada", "source": "tiny", "path": None,
                                       "gguf_file": None, "tokenizer": None, "dtype": "float32",
                                       "arch": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "num_key_value_heads": 2}},
                             "seed": 0, "device": "cpu"})
    model, tok = load_model(conf.model, "cpu", seed=0)
    ad = get_adapter(model)
    calib = build_calib_set(tok, "wiki.train", 4, 24, 0, mask_token_id=ad.mask_token_id)
    q = QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(4, symmetric=False))
    get_method(method, cfg).apply(QuantContext(model, ad, q, calib, batch_size=2, progress=False))
    save_quantized(model, conf, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DESCRIPTION, TENSORS]
    back, _, _ = load_quantized(tmp_path)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)
    kinds = {type(m).__name__ for m in back.modules()}
    assert "InputQuantizer" in kinds and "QKVHook" in kinds
    # shared online modules stay shared (one q/k/v transform per layer, not three copies)
    assert len({id(m) for m in back.modules()}) == len({id(m) for m in model.modules()})
    assert ("TypeMask" in kinds) == (method == "freeact")


def test_old_pickles_and_foreign_classes_are_refused(tmp_path):
    from freeact.artifacts import ArtifactError, load_quantized, rebuild

    torch.save({"config": {}}, tmp_path / "quantized.pt")
    with pytest.raises(ArtifactError, match="pickle of an older freeact: opening it can run code"):
        load_quantized(tmp_path)
    with pytest.raises(ArtifactError, match="not a freeact class"):
        rebuild({"class": "os.system", "attrs": {}, "params": {}, "buffers": {}, "children": {}}, "x", None, {})
    with pytest.raises(ArtifactError, match="not a module class"):
        rebuild({"class": "freeact.artifacts.save_quantized", "attrs": {}, "params": {}, "buffers": {},
                 "children": {}}, "x", None, {})
