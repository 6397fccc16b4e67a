"""Config schemas, registered in Hydra's ConfigStore: one dataclass per config group (here) and one per
method (:mod:`freeact.config.methods`), and the identity of a run (:func:`config_hash`). This package
imports nothing else of the project; the checks a config must pass before any compute are in
:mod:`freeact.validate`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .methods import SETTINGS


class ConfigError(ValueError):
    """A bad config value; the message names the key (raised by :func:`freeact.validate.validate`)."""


@dataclass
class QuantSpecConfig:
    bits: int = 16
    symmetric: bool = True
    granularity: str = "row"
    group_size: int = 128
    clip_ratio: float = 1.0


@dataclass
class QuantConfig:
    name: str = MISSING
    weight: QuantSpecConfig = field(default_factory=QuantSpecConfig)
    act: QuantSpecConfig = field(default_factory=QuantSpecConfig)
    kv: QuantSpecConfig = field(default_factory=lambda: QuantSpecConfig(symmetric=False))


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = "causal"  # causal | llada | dream | vlm
    source: str = "tiny"  # tiny | pretrained
    path: Optional[str] = None  # hub id or local directory (source=pretrained)
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # default: the checkpoint's, or the shipped one for tiny models
    dtype: str = "auto"
    arch: Any = field(default_factory=dict)  # architecture dims for source=tiny
    quantize_vision: bool = False  # vlm: also RTN-quantize the vision tower and projector
    # issue 14: run the checkpoint's own code (tokenizer/model classes named in its auto_map), e.g.
    # Dream's tokenizer on the hub; off by default, named in the error when a checkpoint needs it
    trust_remote_code: bool = False


@dataclass
class CalibConfig:
    name: str = "wiki"
    source: str = "wiki.train"
    nsamples: int = 32
    seqlen: int = 128
    batch_size: int = 8
    mask_t_min: float = 0.0  # dLLMs: masking ratio t ~ U(t_min, t_max) per sequence
    mask_t_max: float = 1.0
    kind: str = "text"  # text | multimodal (image-text records; source: synthetic or a JSONL folder)
    text_field: str = "text"  # dataset sources: the column holding the text


@dataclass
class EvalConfig:
    """What every evaluation has; one schema per kind below (``conf/eval/*.yaml`` pick theirs)."""

    name: str = "text"  # prefix of the metric columns
    kind: str = "text"  # text | multimodal (image-text records; source: synthetic or a JSONL folder)
    source: str = "wiki.test"
    batch_size: int = 8
    seed: int = 1234
    # the quantized model's input pipelines: eager (torch ops) | auto (the fused Triton kernels on a GPU, eager
    # elsewhere) | triton (the kernels; a GPU or TRITON_INTERPRET=1). The kernels give eager's numbers up to a
    # rare one-level rounding flip of a transformed input (freeact/kernels/act_quant.py)
    kernels: str = "eager"


@dataclass
class TextEvalConfig(EvalConfig):
    """Perplexity (AR) or the Monte-Carlo ELBO (dLLM) on held-out text."""

    seqlen: int = 128
    max_chunks: Optional[int] = 16
    mc_num: int = 16  # dLLM Monte-Carlo draws per sequence
    text_field: str = "text"  # dataset sources: the column holding the text
    # on a GPU: replay the forwards from CUDA graphs, one per batch shape (freeact/eval/cuda_graphs.py); the
    # host's launch cost goes, the numbers stay (full logits where the head would be restricted to the masks)
    cuda_graph: bool = False


@dataclass
class HarnessEvalConfig(TextEvalConfig):
    """lm-eval tasks (freeact/eval/harness.py), with the text metric above unless ``text: false``."""

    text: bool = True  # also run the text perplexity / ELBO above
    tasks: List[str] = field(default_factory=list)
    limit: Optional[int] = None  # documents per task (None = all)
    num_fewshot: Optional[int] = None  # None = each task's default
    gen_length: int = 256  # tokens generated (dLLM answer length; AR max_gen_toks)
    steps: int = 256  # dLLM denoising steps
    block_length: Optional[int] = 32  # dLLM semi-autoregressive block (None = gen_length)
    remasking: str = "auto"  # auto | low_confidence | entropy | random
    # generation (issue 14): dLLM sampler (freeact/eval/sampling.py)
    schedule: str = "auto"  # auto (dream for Dream-style models, else llada) | llada | dream
    alg: str = "entropy"  # schedule=dream: origin | maskgit_plus | topk_margin | entropy
    alg_temp: Optional[float] = None  # schedule=dream: sample committed positions from softmax(conf/alg_temp)
    top_p: Optional[float] = None  # nucleus filtering of the token distribution (None = off)
    top_k: Optional[int] = None  # top-k filtering (None = off)
    temperature: Optional[float] = None  # None = the task's gen_kwargs (greedy unless do_sample)
    cfg: float = 0.0  # classifier-free guidance, generation and likelihood (0 = off): un + (cfg+1)(cond - un)
    include_path: Optional[str] = None  # extra directory of lm-eval task YAMLs
    # likelihood (issue 14)
    likelihood: str = "auto"  # dLLM likelihood estimator: auto (the family's own) | llada | dream


@dataclass
class MultimodalEvalConfig(EvalConfig):
    """An image-text benchmark on local records (freeact/eval/multimodal.py)."""

    name: str = "mm"
    kind: str = "multimodal"
    source: str = "synthetic"
    nsamples: Optional[int] = None  # records used (synthetic: how many are generated)
    max_new_tokens: int = 8  # greedy answer length


@dataclass
class LmmsEvalConfig(EvalConfig):
    """lmms-eval tasks on the in-memory (quantized) VLM (freeact/eval/lmms_bridge.py): lmms-eval's own task
    library, task YAMLs of ``include_path``, and/or local image-text records (``source``) as the
    ``freeact_vqa_{open,text,mc}`` tasks."""

    name: str = "lmms"
    kind: str = "lmms"
    source: Optional[str] = None  # local records as tasks: a JSONL folder | synthetic | easy_vqa/<split> | null
    nsamples: Optional[int] = None  # source=synthetic: how many items are generated
    tasks: List[str] = field(default_factory=list)  # lmms-eval task (or group) names
    include_path: Optional[str] = None  # a directory of lmms-eval task YAMLs (searched recursively)
    include_defaults: bool = True  # also index lmms-eval's own tasks (false: only include_path's)
    limit: Optional[int] = None  # documents per task (None = all)
    max_new_tokens: int = 32  # greedy answer length, unless a task's generation_kwargs say otherwise


EVAL_SCHEMAS = {"text": TextEvalConfig, "harness": HarnessEvalConfig, "multimodal": MultimodalEvalConfig,
                "lmms": LmmsEvalConfig}


@dataclass
class LoggerConfig:
    name: str = "csv"
    wandb: bool = False
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "freeact"
    entity: Optional[str] = None


SCHEMAS = {"quant": QuantConfig, "model": ModelConfig, "calib": CalibConfig, "eval": TextEvalConfig,
           "logger": LoggerConfig}  # eval: one schema per kind (EVAL_SCHEMAS); the default kind's here
cs = ConfigStore.instance()
for _group, _node in SCHEMAS.items():  # conf/<group>/*.yaml: defaults [/schema/<group>@_here_]
    if _group != "eval":
        cs.store(group="schema", name=_group, node=_node)
for _name, _node in EVAL_SCHEMAS.items():  # conf/eval/*.yaml: defaults [/schema/eval/<kind>@_here_]
    cs.store(group="schema/eval", name=_name, node=_node)
for _name, _node in SETTINGS.items():  # conf/method/<name>.yaml: defaults [/schema/method/<name>@_here_, _self_]
    cs.store(group="schema/method", name=_name, node=_node)


def config_hash(cfg: DictConfig) -> str:
    """Identity of a run: everything that changes its numbers (not logging or bookkeeping keys)."""
    import hashlib

    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("logger", "force", "progress", "results_file", "save_model", "tag"):
        c.pop(k, None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]

