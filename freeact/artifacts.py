"""Save a quantized run and rebuild it: ``save_quantized(model, cfg, dir)`` / ``load_quantized(dir)``.

A run folder holds two files, neither of which can run code when opened:

* ``quantized.safetensors``: every tensor of the quantized model (fused / rotated / merged weights already
  on their quantization grid, as floats, so metrics reproduce bit for bit; norms; the parameters and
  buffers of every online transform and clipping value);
* ``quantized.json``: the resolved config (how to rebuild the base model), and a description of each online
  piece: each linear's :class:`~freeact.quant.act.InputQuantizer` and each attention module's
  ``qkv_hook``, as a tree of ``freeact`` module classes with their plain settings (numbers, strings,
  quantizer specs) and the names, shapes and dtypes of their tensors; the token-type rules.

Loading rebuilds the base architecture from the config, rebuilds the online pieces from their
descriptions (only classes of ``freeact`` that are ``nn.Module`` subclasses), attaches them by module name
and loads the tensors strictly (``safetensors``, no pickle). Files of the older pickle format
(``quantized.pt``) are refused with a message.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .quant.act import attach_input_quantizer, input_quantizers
from .quant.kv import IMPL
from .quant.spec import QuantSpec

TENSORS, DESCRIPTION, OLD_PICKLE = "quantized.safetensors", "quantized.json", "quantized.pt"
FORMAT = 1
_MODULE_STATE = set(nn.Module().__dict__)  # nn.Module's own bookkeeping: rebuilt by nn.Module.__init__
_CACHES = {"_memo": None, "_served": None, "consumers": 0}  # per-forward caches and attach counts: saved empty


class ArtifactError(ValueError):
    pass


# ----------------------------------------------------------------------------- describing modules
def _encode(value, where: str, extra: dict):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, QuantSpec):
        return {"$quantspec": dataclasses.asdict(value)}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return {"$list" if isinstance(value, list) else "$tuple": [_encode(v, where, extra) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: _encode(v, f"{where}.{k}", extra) for k, v in value.items()}}
    if type(value).__name__ == "TokenTypes":
        return {"$token_types": True}  # the model's one TokenTypes object, rebuilt from its rules
    if isinstance(value, torch.Tensor):
        key = f"__attr__.{where}"
        extra[key] = value.detach()
        return {"$tensor": key}
    raise ArtifactError(f"cannot save {where}: a {type(value).__name__} is not a plain setting")


def describe(module: nn.Module, where: str, extra: dict, seen: dict) -> dict:
    """A JSON-able description of ``module`` (tensors by name; non-persistent buffers and plain tensor
    attributes go to ``extra`` under their own keys). A module met before (``seen``: id -> where; e.g. the
    one transform of q/k/v_proj) is described as a reference to its first place, so sharing survives."""
    if id(module) in seen:
        return {"ref": seen[id(module)]}
    seen[id(module)] = where
    cls = type(module)
    if not cls.__module__.startswith("freeact."):
        raise ArtifactError(f"cannot save {where}: {cls.__module__}.{cls.__qualname__} is not a freeact module "
                            "(a parametrization left on, or a foreign module)")
    attrs = {k: (_CACHES[k] if k in _CACHES else _encode(v, f"{where}.{k}", extra))
             for k, v in module.__dict__.items() if k not in _MODULE_STATE}
    params = {n: None if p is None else [list(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad]
              for n, p in module._parameters.items()}
    buffers = {}
    for n, b in module._buffers.items():
        persistent = n not in module._non_persistent_buffers_set
        buffers[n] = None if b is None else [list(b.shape), str(b.dtype).removeprefix("torch."), persistent]
        if b is not None and not persistent:
            extra[f"__buffer__.{where}.{n}"] = b.detach()
    children = {n: None if c is None else describe(c, f"{where}.{n}", extra, seen) for n, c in module._modules.items()}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs, "params": params,
            "buffers": buffers, "children": children}


def _decode(value, token_types, tensors: dict):
    if not isinstance(value, dict):
        return value
    (tag, inner), = value.items()
    if tag == "$quantspec":
        return QuantSpec(**inner)
    if tag == "$dtype":
        return getattr(torch, inner)
    if tag in ("$list", "$tuple"):
        out = [_decode(v, token_types, tensors) for v in inner]
        return out if tag == "$list" else tuple(out)
    if tag == "$dict":
        return {k: _decode(v, token_types, tensors) for k, v in inner.items()}
    if tag == "$token_types":
        return token_types
    if tag == "$tensor":
        return tensors[inner]
    raise ArtifactError(f"unknown tag {tag!r} in {DESCRIPTION}")


def _module_class(path: str) -> type:
    mod, _, name = path.rpartition(".")
    if not mod.startswith("freeact."):
        raise ArtifactError(f"{DESCRIPTION} names {path}, which is not a freeact class")
    cls = importlib.import_module(mod)
    for part in name.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArtifactError(f"{DESCRIPTION} names {path}, which is not a module class")
    return cls


def rebuild(desc: dict, where: str, token_types, tensors: dict, built: dict | None = None) -> nn.Module:
    """The module ``desc`` describes, with empty tensors of the right shapes (filled by the state dict);
    ``built`` (where -> module) resolves references to modules rebuilt before."""
    built = {} if built is None else built
    if "ref" in desc:
        if desc["ref"] not in built:
            raise ArtifactError(f"{DESCRIPTION}: {where} refers to {desc['ref']}, which comes later or nowhere")
        return built[desc["ref"]]
    cls = _module_class(desc["class"])
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    for k, v in desc["attrs"].items():
        obj.__dict__[k] = _decode(v, token_types, tensors)
    for n, p in desc["params"].items():
        obj.register_parameter(n, None if p is None else nn.Parameter(torch.empty(p[0], dtype=getattr(torch, p[1])),
                                                                     requires_grad=p[2]))
    for n, b in desc["buffers"].items():
        if b is None:
            obj.register_buffer(n, None)
            continue
        t = tensors[f"__buffer__.{where}.{n}"] if not b[2] else torch.empty(b[0], dtype=getattr(torch, b[1]))
        obj.register_buffer(n, t, persistent=b[2])
    built[where] = obj
    for n, c in desc["children"].items():
        obj._modules[n] = None if c is None else rebuild(c, f"{where}.{n}", token_types, tensors, built)
    return obj


# ----------------------------------------------------------------------------- save / load
def _is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def save_quantized(model, cfg: DictConfig | dict, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    extra: dict = {}
    seen: dict = {}
    tt = getattr(model, "freeact_token_types", None)
    desc = {
        "format": FORMAT,
        "config": config,
        "tied": _is_tied(model),
        "token_types": None if tt is None else [list(rule) for rule in tt.spec()],
        "input_quantizers": {n: describe(iq, n, extra, seen) for n, iq in input_quantizers(model).items()},
        "qkv_hooks": {n: describe(m.qkv_hook, n, extra, seen) for n, m in model.named_modules()
                      if isinstance(getattr(m, "qkv_hook", None), nn.Module)},
    }
    tensors, seen = {}, set()
    for k, v in {**model.state_dict(), **extra}.items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in seen:  # tied / shared storage: safetensors stores each once
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    for name, text in ((TENSORS, None), (DESCRIPTION, json.dumps(desc, indent=1))):
        tmp = path / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"}) if text is None else tmp.write_text(text)
        tmp.replace(path / name)
    return path / TENSORS


def load_quantized(path: str | Path, device: str | None = None):
    """Rebuild a saved quantized model (a run folder, or its ``quantized.json``). Returns
    ``(model, tokenizer, config)``."""
    from safetensors.torch import load_file

    from .models.loading import load_model, pick_device
    from .models.token_types import TokenTypes

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / DESCRIPTION).exists():
        if (folder / OLD_PICKLE).exists() or path.suffix == ".pt":
            raise ArtifactError(f"{folder / OLD_PICKLE} is a pickle of an older freeact: opening it can run code, "
                                "so it is not loaded. Run its config again with save_model=true (the new format "
                                "is safetensors + JSON), or, only if you trust its origin, torch.load it yourself")
        raise ArtifactError(f"no {DESCRIPTION} in {folder}: not a saved run (save_model=true writes one)")
    desc = json.loads((folder / DESCRIPTION).read_text())
    if desc.get("format") != FORMAT:
        raise ArtifactError(f"{folder / DESCRIPTION}: format {desc.get('format')!r}, this freeact reads {FORMAT}")
    tensors = load_file(str(folder / TENSORS))
    cfg = OmegaConf.create(desc["config"])
    device = device or pick_device(cfg.get("device", "auto"))
    model, tok = load_model(cfg.model, "cpu", seed=cfg.get("seed", 0))
    if _is_tied(model) and not desc["tied"]:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    token_types = None
    if desc["token_types"] is not None:
        token_types = TokenTypes([(name, ids) for name, ids in desc["token_types"]]).attach(model)
    built: dict = {}
    for name, d in desc["input_quantizers"].items():
        attach_input_quantizer(model.get_submodule(name), rebuild(d, name, token_types, tensors, built))
    for name, d in desc["qkv_hooks"].items():
        model.get_submodule(name).qkv_hook = rebuild(d, name, token_types, tensors, built)
    if desc["qkv_hooks"]:
        model.set_attn_implementation(IMPL)
    state = {k: v for k, v in tensors.items() if not k.startswith(("__attr__.", "__buffer__."))}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tok, cfg
