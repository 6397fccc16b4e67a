"""Save a quantized run and rebuild it: ``save_quantized(model, cfg, dir)`` / ``load_quantized(dir)``.

A run folder holds ``quantized.pt`` with
* the resolved config (how to rebuild the base model),
* the full state dict of the quantized model: fused / rotated / merged weights already on their
  quantization grid (fake-quantized floats, so metrics reproduce bit for bit), norms, and the
  parameters of every online transform and clipping value,
* the online pieces themselves: each linear's :class:`~freeact.quant.act.InputQuantizer` (its
  transform and activation quantizer), each attention module's ``qkv_hook``, and the model's
  :class:`~freeact.models.token_types.TokenTypes` rules.
Loading rebuilds the base architecture from the config, re-attaches the online pieces by module
name, and loads the state dict strictly, so nothing of the method's calibration is re-run.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .quant.act import attach_input_quantizer, input_quantizers
from .quant.kv import IMPL

FILE = "quantized.pt"


def save_quantized(model, cfg: DictConfig | dict, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    payload = {
        "config": config,
        "state_dict": model.state_dict(),
        "input_quantizers": input_quantizers(model),
        "qkv_hooks": {n: m.qkv_hook for n, m in model.named_modules() if hasattr(m, "qkv_hook")},
        "token_types": getattr(model, "freeact_token_types", None),
        "tied": _is_tied(model),
    }
    tmp = path / (FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path / FILE)
    return path / FILE


def _is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def load_quantized(path: str | Path, device: str | None = None):
    """Rebuild a saved quantized model. Returns ``(model, tokenizer, config)``."""
    from .models.loading import load_model, pick_device

    path = Path(path)
    payload = torch.load(path / FILE if path.is_dir() else path, map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(payload["config"])
    device = device or pick_device(cfg.get("device", "auto"))
    model, tok = load_model(cfg.model, "cpu", seed=cfg.get("seed", 0))
    if _is_tied(model) and not payload["tied"]:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for name, iq in payload["input_quantizers"].items():
        attach_input_quantizer(model.get_submodule(name), iq)
    for name, hook in payload["qkv_hooks"].items():
        model.get_submodule(name).qkv_hook = hook
    if payload["qkv_hooks"]:
        model.set_attn_implementation(IMPL)
    if payload["token_types"] is not None:
        payload["token_types"].attach(model)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(device).eval(), tok, cfg
