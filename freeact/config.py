"""Config schemas (registered in Hydra's ConfigStore) and the checks a config must pass before
any compute starts. Every failure is a :class:`ConfigError` whose message names the key."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .quant.spec import GRANULARITIES, QuantSpec


class ConfigError(ValueError):
    pass


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


@dataclass
class EvalConfig:
    name: str = "text"
    source: str = "wiki.test"
    seqlen: int = 128
    max_chunks: Optional[int] = 16
    batch_size: int = 8
    mc_num: int = 16  # dLLM Monte-Carlo draws per sequence
    seed: int = 1234
    kind: str = "text"  # text | multimodal (image-text records; source: synthetic or a JSONL folder)
    nsamples: Optional[int] = None  # multimodal: records used (synthetic: how many are generated)
    max_new_tokens: int = 8  # multimodal: greedy answer length
    # lm-eval tasks (freeact/eval/harness.py); empty = text metric only
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
class LoggerConfig:
    name: str = "csv"
    wandb: bool = False
    mode: str = "offline"  # wandb: offline | online | disabled
    project: str = "freeact"
    entity: Optional[str] = None


cs = ConfigStore.instance()
cs.store(group="quant", name="quant_schema", node=QuantConfig)
cs.store(group="model", name="model_schema", node=ModelConfig)
cs.store(group="calib", name="calib_schema", node=CalibConfig)
cs.store(group="eval", name="eval_schema", node=EvalConfig)
cs.store(group="logger", name="logger_schema", node=LoggerConfig)

FAMILIES = ("causal", "llada", "dream", "vlm")
DATA_KINDS = ("text", "multimodal")
SOURCES = ("tiny", "pretrained")
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
WEIGHT_ALGOS = ("rtn", "gptq", "none")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def spec(cfg, key: str) -> QuantSpec:
    s = cfg.quant[key]
    _check(2 <= s.bits <= 16, f"quant.{key}.bits={s.bits} must be in 2..16 (16 = not quantized)")
    from .quant.spec import _ALIASES

    g = _ALIASES.get(s.granularity, s.granularity)
    _check(g in GRANULARITIES, f"quant.{key}.granularity={s.granularity!r} must be one of {GRANULARITIES}")
    _check(0 < s.clip_ratio <= 1, f"quant.{key}.clip_ratio={s.clip_ratio} must be in (0, 1]")
    _check(g != "group" or s.group_size > 0, f"quant.{key}.group_size={s.group_size} must be > 0")
    return QuantSpec(bits=s.bits, symmetric=s.symmetric, granularity=g, group_size=s.group_size,
                     clip_ratio=s.clip_ratio)


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _resolve_package_path(key: str, path: str) -> str:
    """``pkg://PACKAGE/sub/dir`` -> a directory of the installed package (see models.loading.resolve_path)."""
    from .paths import resolve_path

    try:
        return resolve_path(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None


def model_widths(m) -> dict:
    """hidden / intermediate / head dims of the configured model, read without loading weights."""
    if m.source == "tiny":
        raw = OmegaConf.to_container(m.arch)
    elif m.get("gguf_file"):  # a GGUF file holds its config in its metadata (no config.json)
        from transformers import AutoConfig

        from .paths import resolve_path

        raw = AutoConfig.from_pretrained(resolve_path(m.path), gguf_file=m.gguf_file).to_dict()
    else:
        from transformers.utils import cached_file

        from .paths import resolve_path

        with open(cached_file(resolve_path(m.path), "config.json")) as f:
            raw = json.load(f)
    raw = raw.get("text_config") or raw  # a VLM: the language model's widths
    h = raw.get("hidden_size") or raw.get("d_model")
    heads = raw.get("num_attention_heads") or raw.get("n_heads")
    return {"hidden": h, "intermediate": raw.get("intermediate_size") or raw.get("mlp_hidden_size"),
            "head_dim": raw.get("head_dim") or (h // heads if h and heads else None)}


def _check_multimodal_source(cfg: DictConfig, key: str) -> None:
    import importlib.util

    from .data import easy_vqa
    from .data.multimodal import SYNTHETIC, jsonl_file

    _check(cfg.model.family == "vlm", f"{key}.kind=multimodal needs a vision-language model (model.family=vlm), "
                                      f"got model.family={cfg.model.family!r}")
    source = cfg[key].source
    if easy_vqa.is_easy_vqa(source):
        split = source[len(easy_vqa.PREFIX):]
        _check(split in easy_vqa.SPLITS, f"{key}.source={source}: the split must be one of {easy_vqa.SPLITS}")
        _check(importlib.util.find_spec("easy_vqa") is not None,
               f"{key}.source={source} needs the easy-vqa package (pip install -e .[real])")
        return
    if source == SYNTHETIC:
        _check(bool(cfg[key].get("nsamples")), f"{key}.nsamples must be > 0 for source=synthetic")
        return
    try:
        jsonl_file(source)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}.source: {e}") from None


def _check_text_source(cfg: DictConfig, key: str) -> None:
    """A shipped corpus or text file must exist; a dataset source (``hf:...``, a local data folder)
    is loaded here, before the model (``datasets`` is imported only then), so that a dataset missing
    offline, a bad split or a missing text column fail as a config error."""
    from .data.sources import SourceError, is_dataset_source, load_text_dataset
    from .data.text import text_path

    source = str(cfg[key].source)
    try:
        if is_dataset_source(source):
            load_text_dataset(source, cfg[key].get("text_field") or "text")
        else:
            text_path(source)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}.source: {e}") from None
    except SourceError as e:
        raise ConfigError(f"{key}.source={source}: {e}") from None


def validate(cfg: DictConfig, method_names) -> dict[str, QuantSpec]:
    """Raise ConfigError on the first bad value; return the quantizer specs. ``method_names``: the
    registered methods, or a callable giving them (called only once the cheap checks passed, since
    it imports the methods: a bad value is reported before torch is loaded)."""
    _check(cfg.method.get("weight_algo", "rtn") in WEIGHT_ALGOS,
           f"method.weight_algo={cfg.method.get('weight_algo')!r} must be one of {WEIGHT_ALGOS}")
    m = cfg.model
    _check(m.family in FAMILIES, f"model.family={m.family!r} must be one of {FAMILIES}")
    _check(m.source in SOURCES, f"model.source={m.source!r} must be one of {SOURCES}")
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r} must be one of {DTYPES}")
    if m.source == "pretrained":
        _check(bool(m.path), "model.path must be set for a pretrained model (a hub id or a local directory)")
        path = _resolve_package_path("model.path", m.path)
        if _is_local(path):
            _check(Path(path).expanduser().exists(), f"model.path={m.path} does not exist")
        if m.get("gguf_file"):
            _check(Path(path, m.gguf_file).exists(), f"model.gguf_file={m.gguf_file} is not in {path}")
    if m.tokenizer:
        tok = _resolve_package_path("model.tokenizer", m.tokenizer)
        _check(not _is_local(tok) or Path(tok).expanduser().exists(), f"model.tokenizer={m.tokenizer} does not exist")
    specs = {k: spec(cfg, k) for k in ("weight", "act", "kv")}
    _check(cfg.calib.nsamples > 0, f"calib.nsamples={cfg.calib.nsamples} must be > 0")
    _check(cfg.calib.seqlen > 1, f"calib.seqlen={cfg.calib.seqlen} must be > 1")
    _check(cfg.eval.seqlen > 1, f"eval.seqlen={cfg.eval.seqlen} must be > 1")
    _check(cfg.eval.mc_num > 0, f"eval.mc_num={cfg.eval.mc_num} must be > 0")
    if cfg.eval.get("tasks"):
        from .eval.harness import check_task_settings

        try:
            check_task_settings(cfg.eval)
        except ValueError as e:
            raise ConfigError(f"eval: {e}") from None
    _check(0 <= cfg.calib.mask_t_min <= cfg.calib.mask_t_max <= 1,
           f"calib.mask_t_min/max=({cfg.calib.mask_t_min}, {cfg.calib.mask_t_max}) must satisfy 0 <= min <= max <= 1")
    for key in ("calib", "eval"):
        kind = cfg[key].get("kind", "text")
        _check(kind in DATA_KINDS, f"{key}.kind={kind!r} must be one of {DATA_KINDS}")
        if kind == "multimodal":
            _check_multimodal_source(cfg, key)
            continue
        _check_text_source(cfg, key)
    _check(cfg.logger.mode in ("offline", "online", "disabled"),
           f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled")
    names = method_names() if callable(method_names) else method_names
    _check(cfg.method.name in names, f"method.name={cfg.method.name!r} is not one of {names}")
    try:
        widths = model_widths(m)
    except (OSError, KeyError, TypeError) as e:
        raise ConfigError(f"model: cannot read the architecture of {m.name}: {e}") from None
    for key, s in specs.items():
        if s.enabled and s.granularity == "group":
            dims = [widths["head_dim"]] if key == "kv" else [widths["hidden"], widths["intermediate"]]
            for d in dims:
                _check(d is None or d % s.group_size == 0,
                       f"quant.{key}.group_size={s.group_size} does not divide the width {d} of {m.name}")
    return specs


def config_hash(cfg: DictConfig) -> str:
    """Identity of a run: everything that changes its numbers (not logging or bookkeeping keys)."""
    import hashlib

    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("logger", "force", "progress", "results_file", "save_model", "tag"):
        c.pop(k, None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]

