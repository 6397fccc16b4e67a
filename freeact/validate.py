"""The checks a composed config must pass before any compute: every key known, every value typed and in
range, files, packages and the hub reachable, the results file writable, the device there. The first
failure raises :class:`~freeact.config.ConfigError` with one line naming the key. Cheap checks come first,
so a bad value is reported before torch is imported."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import EVAL_SCHEMAS, SCHEMAS, ConfigError, MultimodalEvalConfig, QuantSpecConfig, TextEvalConfig
from .config.methods import (FAMILY_TYPE_NAMES, FreeActSettings, MethodSettings, SettingsError, apply_all_methods,
                             as_dict, parse_settings)
from .quant.spec import _ALIASES, GRANULARITIES, QuantSpec

FAMILIES = tuple(FAMILY_TYPE_NAMES)  # every family says which token types it defines
DATA_KINDS = ("text", "multimodal")
SOURCES = ("tiny", "pretrained")
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


EVAL_KERNELS = ("eager", "auto", "triton")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def spec(cfg, key: str) -> QuantSpec:
    s = cfg.quant[key]
    _check(2 <= s.bits <= 16, f"quant.{key}.bits={s.bits} must be in 2..16 (16 = not quantized)")
    g = _ALIASES.get(s.granularity, s.granularity)
    _check(g in GRANULARITIES, f"quant.{key}.granularity={s.granularity!r} must be one of {GRANULARITIES}")
    _check(0 < s.clip_ratio <= 1, f"quant.{key}.clip_ratio={s.clip_ratio} must be in (0, 1]")
    _check(g != "group" or s.group_size > 0, f"quant.{key}.group_size={s.group_size} must be > 0")
    return QuantSpec(bits=s.bits, symmetric=s.symmetric, granularity=g, group_size=s.group_size,
                     clip_ratio=s.clip_ratio)


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _resolve_package_path(key: str, path: str) -> str:
    """``pkg://PACKAGE/sub/dir`` -> a directory of the installed package (see freeact.paths.resolve_path)."""
    from .paths import resolve_path

    try:
        return resolve_path(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None


_ARCH_COUNT = re.compile(r"(^num_|_size$|_layers$|_heads$|^depth$|_embeddings$)")


def _check_tiny_arch(arch, prefix: str) -> None:
    """No number of a tiny model's architecture (nested: a VLM's ``text_config``, ``vision_config``) is negative,
    and its sizes and counts are positive."""
    for k, v in (arch or {}).items():
        if isinstance(v, dict):
            _check_tiny_arch(v, f"{prefix}.{k}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            _check(v >= 0, f"{prefix}.{k}={v} must be >= 0")
            _check(v > 0 or not _ARCH_COUNT.search(k), f"{prefix}.{k}={v} must be > 0")


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
    from .data.vqa_records import jsonl_file
    from .data.vqa_sources import SYNTHETIC

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


def _check_lmms(cfg: DictConfig) -> None:
    """``eval=lmms``: a VLM, its optional records source, the task settings and names (lmms-eval's index), and
    that each named task's documents load."""
    from .eval.lmms_bridge import check_lmms_settings, check_task_data

    _check(cfg.model.family == "vlm", f"eval=lmms runs image-text tasks: it needs a vision-language model "
                                      f"(model.family=vlm), got model.family={cfg.model.family!r}")
    if cfg.eval.get("source"):
        _check_multimodal_source(cfg, "eval")
    try:
        check_lmms_settings(cfg.eval)
        check_task_data(cfg.eval)
    except ValueError as e:
        raise ConfigError(f"eval: {e}") from None


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


TOP_LEVEL = ("seed", "device", "results_file", "force", "progress", "tag", "save_model", "all_methods",
             "model", "method", "quant", "calib", "eval", "logger")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted(known), n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?)" if close else ""
    return ConfigError(f"{key} is not a setting{hint}")


def _fields(schema) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def group_schema(cfg: DictConfig, group: str):
    """The schema of ``cfg.<group>``: the node's own (the eval configs have one per kind), else the group's."""
    schema = OmegaConf.get_type(cfg[group])
    return schema if dataclasses.is_dataclass(schema) else SCHEMAS[group]


EVAL_EXAMPLES = {"text": "eval=text", "harness": "eval=harness", "multimodal": "eval=mm_easyvqa", "lmms": "eval=lmms"}


def _unknown_eval_key(key: str, schema) -> ConfigError:
    """An eval key this kind of evaluation lacks: name the kinds that have it, if any."""
    owners = [kind for kind, sch in EVAL_SCHEMAS.items() if key in _fields(sch)]
    if not owners:
        return _unknown(f"eval.{key}", _fields(schema))
    kind = next((k for k, sch in EVAL_SCHEMAS.items() if sch is schema), schema.__name__)
    return ConfigError(f"eval.{key} is not a setting of a {kind} evaluation; "
                       f"{' and '.join(EVAL_EXAMPLES[o] for o in owners)} {'has' if len(owners) == 1 else 'have'} it")


def check_keys(cfg: DictConfig) -> None:
    """Every key is one the run reads: Hydra's ``+group.key=...`` adds keys to any config, so keys that
    no schema has (``+quant.wbits=4``) are rejected here instead of being silently recorded."""
    for key in cfg:
        if key not in TOP_LEVEL:
            raise _unknown(str(key), TOP_LEVEL)
    for group in SCHEMAS:
        schema = group_schema(cfg, group)
        known = _fields(schema)
        for key in cfg[group]:
            if key not in known:
                raise _unknown_eval_key(key, schema) if group == "eval" else _unknown(f"{group}.{key}", known)
    spec_keys = _fields(QuantSpecConfig)
    for part in ("weight", "act", "kv"):
        for key in cfg.quant[part]:
            if key not in spec_keys:
                raise _unknown(f"quant.{part}.{key}", spec_keys)


def resolve_method(cfg: DictConfig, explicit: Iterable[str] = ()) -> MethodSettings:
    """Complete ``cfg.method`` with its defaults and the ``all_methods`` settings it has, check it (token-type
    names against ``cfg.model.family`` too), and write the result back (what the row records); ``all_methods``
    is then dropped. ``explicit``: the ``method.<key>`` set on the command line (they win over ``all_methods``)."""
    raw = OmegaConf.to_container(cfg.method, resolve=True)
    shared = OmegaConf.to_container(cfg.all_methods, resolve=True) if cfg.get("all_methods") else {}
    try:
        settings = parse_settings(apply_all_methods(raw, shared, set(explicit)))
        if isinstance(settings, FreeActSettings):
            settings.check_token_types(cfg.model.family)
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    with open_dict(cfg):
        cfg.method = OmegaConf.create(as_dict(settings))
        cfg.pop("all_methods", None)
    return settings


def _writable_file(key: str, path: str) -> None:
    """``path`` can be created (in its nearest existing folder: nothing is made here) or appended to."""
    p = Path(path).expanduser().absolute()
    folder = p.parent
    while not folder.exists():
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".freeact-check-"):
            pass
        if p.exists() and not os.access(p, os.W_OK):
            raise PermissionError(f"{p} is read-only")
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be written: {e.strerror or e}") from None


def check_device_form(device) -> None:
    """``device``: auto, cpu, cuda or cuda:N (cheap: no import)."""
    _check(isinstance(device, str) and bool(_DEVICE.match(device)),
           f"device={device!r} must be auto, cpu, cuda or cuda:N")


def check_device_there(device: str) -> None:
    """A ``cuda`` device asked for exists (imports torch: call after the cheap checks)."""
    if device.startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), f"device={device}: no CUDA device is available here (device=auto or cpu)")
        n = int(device.split(":")[1]) if ":" in device else 0
        _check(n < torch.cuda.device_count(), f"device={device}: only {torch.cuda.device_count()} CUDA device(s)")


def validate(cfg: DictConfig, explicit_method_keys: Iterable[str] = ()) -> dict[str, QuantSpec]:
    """Raise ConfigError on the first bad value; return the quantizer specs. Completes ``cfg.method``
    (see :func:`resolve_method`). Cheap checks first: a bad value is reported before torch is loaded."""
    check_keys(cfg)
    _check(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), f"seed={cfg.seed!r} must be an integer")
    check_device_form(cfg.device)
    for key in ("force", "progress", "save_model"):
        _check(isinstance(cfg[key], bool), f"{key}={cfg[key]!r} must be true or false")
    resolve_method(cfg, explicit_method_keys)
    if cfg.method.get("cuda_graph") is True and not cfg.device.startswith("cuda"):
        _check(cfg.device == "auto" and __import__("torch").cuda.is_available(),
               f"method.cuda_graph=true needs a CUDA device (device={cfg.device}); use auto or false")
    _writable_file("results_file", cfg.results_file)
    if cfg.method.get("save_rotations"):  # SpinQuant: written after the training, so checked before it
        _writable_file("method.save_rotations", cfg.method.save_rotations)
    if cfg.method.get("load_rotations"):
        _check(Path(cfg.method.load_rotations).expanduser().is_file(),
               f"method.load_rotations={cfg.method.load_rotations} does not exist")
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
    _check(cfg.calib.batch_size >= 1, f"calib.batch_size={cfg.calib.batch_size} must be >= 1")
    _check(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    eval_schema = group_schema(cfg, "eval")
    expected = eval_schema.kind  # each eval schema's own kind
    _check(cfg.eval.kind == expected, f"eval.kind={cfg.eval.kind} does not fit eval={cfg.eval.name}, a {expected} "
           "evaluation (image-text benchmarks: eval=mm_*)")
    kernels = cfg.eval.get("kernels", "eager")
    _check(kernels in EVAL_KERNELS, f"eval.kernels={kernels!r} must be one of {EVAL_KERNELS}")
    if kernels == "triton":
        need = f"eval.kernels=triton needs Triton and a CUDA device (device={cfg.device}); use auto or eager"
        _check(not cfg.device.startswith("cpu") or os.environ.get("TRITON_INTERPRET") == "1", need)
        from .kernels import triton_available

        _check(triton_available(), need)
    if issubclass(eval_schema, TextEvalConfig):  # perplexity / ELBO, lm-eval tasks
        _check(cfg.eval.seqlen > 1, f"eval.seqlen={cfg.eval.seqlen} must be > 1")
        _check(cfg.eval.mc_num > 0, f"eval.mc_num={cfg.eval.mc_num} must be > 0")
        _check(cfg.eval.max_chunks is None or cfg.eval.max_chunks >= 1,
               f"eval.max_chunks={cfg.eval.max_chunks} must be >= 1 (null: every chunk)")
        _check(not cfg.eval.get("cuda_graph", False) or cfg.device.startswith("cuda"),
               f"eval.cuda_graph=true replays CUDA graphs: it needs device=cuda (device={cfg.device})")
    if issubclass(eval_schema, MultimodalEvalConfig):
        _check(cfg.eval.nsamples is None or cfg.eval.nsamples >= 1,
               f"eval.nsamples={cfg.eval.nsamples} must be >= 1 (null: every record)")
        _check(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be >= 1")
    if cfg.eval.kind != "lmms" and cfg.eval.get("tasks"):  # lm-eval tasks; lmms-eval's are checked last
        from .eval.harness import check_task_names, check_task_settings

        try:
            check_task_settings(cfg.eval)
            check_task_names(cfg.eval)
        except ValueError as e:
            raise ConfigError(f"eval: {e}") from None
    _check(0 <= cfg.calib.mask_t_min <= cfg.calib.mask_t_max <= 1,
           f"calib.mask_t_min/max=({cfg.calib.mask_t_min}, {cfg.calib.mask_t_max}) must satisfy 0 <= min <= max <= 1")
    for key in ("calib", "eval"):
        kind = cfg[key].get("kind", "text")
        if key == "eval" and kind == "lmms":  # its source (optional) is checked by _check_lmms
            continue
        _check(kind in DATA_KINDS, f"{key}.kind={kind!r} must be one of {DATA_KINDS}")
        if kind == "multimodal":
            _check_multimodal_source(cfg, key)
            continue
        _check_text_source(cfg, key)
    _check(cfg.logger.mode in ("offline", "online", "disabled"),
           f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled")
    if m.source == "tiny":  # the architecture is given here: sizes, counts and epsilons must be positive
        _check_tiny_arch(OmegaConf.to_container(m.arch), "model.arch")
    try:
        widths = model_widths(m)
    except (OSError, KeyError, TypeError) as e:
        if os.environ.get("HF_HUB_OFFLINE") and m.source == "pretrained" and not _is_local(m.path):
            raise ConfigError(f"model.path={m.path} is not in the Hugging Face cache and the hub cannot be reached "
                              "(offline): download it where there is a network, or set model.path to a local "
                              "copy") from None
        raise ConfigError(f"model: cannot read the architecture of {m.name}: {' '.join(str(e).split())}") from None
    for key, s in specs.items():
        if s.enabled and s.granularity == "group":
            dims = [widths["head_dim"]] if key == "kv" else [widths["hidden"], widths["intermediate"]]
            for d in dims:
                _check(d is None or d % s.group_size == 0,
                       f"quant.{key}.group_size={s.group_size} does not divide the width {d} of {m.name}")
    if cfg.eval.kind == "lmms":  # last: naming its tasks means indexing lmms-eval's library (seconds)
        _check_lmms(cfg)
    check_device_there(cfg.device)
    return specs
