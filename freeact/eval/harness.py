"""The lm-eval bridge: evaluate an in-memory (possibly fake-quantized) model on lm-eval tasks.

* AR models run through lm-eval's own ``HFLM(pretrained=model, tokenizer=tok)``;
* masked-diffusion LMs through :class:`freeact.eval.diffusion_lm.DiffusionLM` (``freeact_dllm``):
  Monte-Carlo ELBO likelihoods and diffusion sampling.

Tasks: the offline tasks shipped in ``freeact/eval/tasks`` (``freeact_mc``, ``freeact_mmlu_dev``,
``freeact_gsm8k``, ``freeact_humaneval``) always work; their YAMLs name their data relative to
themselves, and because ``datasets`` resolves relative ``data_files`` against the working
directory, every call writes copies with absolute paths into a temporary include directory.
Any other name (``arc_challenge``, ``gsm8k``, ``mmlu`` ...) is a stock lm-eval task: it needs the
dataset from the Hugging Face hub or its cache. This module sets ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` for the call when they are unset (the default setting here is offline); with
network, export ``HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0`` and pass the stock names unchanged.
``datasets`` reads these variables when it is first imported, so they must be set before that.

Results come back flat: ``{task}.{metric}`` (e.g. ``freeact_mc.acc``), ``{task}.{metric}.{filter}``
for filtered generation metrics (``freeact_gsm8k.exact_match.flexible-extract``), the matching
``..._stderr`` where lm-eval computes one, and ``{task}.n`` (documents evaluated).
Code tasks run model-written code (see :mod:`freeact.eval.tasks.utils`); listing such a task
is taken as consent (lm-eval's ``confirm_run_unsafe_code``).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


# -- local task YAMLs ----------------------------------------------------------------------
class _Function(str):
    """A ``!function module.name`` value, kept as text when YAMLs are rewritten."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _read_task_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_TaskLoader)  # noqa: S506  (SafeLoader + one tag)


def _task_files(tasks_dir: Path) -> list[Path]:
    """The YAML files of a task directory, recursively (lm-eval's ``*_yaml`` templates included)."""
    return sorted(p for p in Path(tasks_dir).rglob("*")
                  if p.is_file() and (p.suffix in (".yaml", ".yml") or p.name.endswith("_yaml")))


def local_task_names(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Names of the tasks defined by the YAMLs in ``tasks_dir``."""
    names = []
    for p in _task_files(tasks_dir):
        cfg = _read_task_yaml(p)
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            names.append(cfg["task"])
    return sorted(names)


def _absolute_data_files(data_files, base: Path):
    if isinstance(data_files, str):
        p = Path(data_files).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise FileNotFoundError(f"task data file {p} does not exist")
        return str(p)
    if isinstance(data_files, (list, tuple)):
        return [_absolute_data_files(d, base) for d in data_files]
    if isinstance(data_files, dict):
        return {k: _absolute_data_files(v, base) for k, v in data_files.items()}
    raise TypeError(f"data_files must be a path, a list or a dict of them, not {type(data_files).__name__}")


def materialize_tasks(dst: Path, tasks_dir: Path = TASKS_DIR) -> Path:
    """Copy the task YAMLs (and Python helpers) of ``tasks_dir`` into ``dst``, keeping the folder
    structure, with ``dataset_kwargs.data_files`` made absolute (relative paths are read as
    relative to the YAML that names them). The data files themselves are not copied."""
    src_root, dst = Path(tasks_dir), Path(dst)
    for src in sorted(p for p in src_root.rglob("*.py") if "__pycache__" not in p.parts):
        (dst / src.relative_to(src_root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / src.relative_to(src_root))
    for src in _task_files(src_root):
        cfg = _read_task_yaml(src)
        kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], src.parent)
        out = dst / src.relative_to(src_root)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            yaml.dump(cfg, f, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)
    return dst


# -- running -------------------------------------------------------------------------------
@contextlib.contextmanager
def offline_defaults():
    """``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` where unset, for the duration."""
    unset = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if v not in os.environ]
    os.environ.update({v: "1" for v in unset})
    try:
        yield
    finally:
        for v in unset:
            os.environ.pop(v, None)


def make_lm(model, adapter, tokenizer, *, batch_size: int = 8, mc_num: int = 128, gen_length: int = 256,
            steps: int = 256, block_length: int | None = 32, remasking: str = "auto", seed: int = 1234,
            progress: bool = True, gen_options: dict | None = None,
            likelihood: str = "auto"):
    """The lm-eval ``LM`` for ``model``: HFLM for AR models, ``freeact_dllm`` for dLLMs."""
    if adapter.objective == "mdm":
        from .diffusion_lm import DiffusionLM

        return DiffusionLM(model, adapter, tokenizer, mc_num=mc_num, batch_size=batch_size, gen_length=gen_length,
                           steps=steps, block_length=block_length, remasking=remasking, seed=seed, progress=progress,
                           likelihood=likelihood, **(gen_options or {}))
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str" warning
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def flatten_results(results: dict) -> dict:
    """lm-eval's ``results`` -> ``{task.metric[.filter][_stderr]: float, task.n: int}``."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}.{metric}" if filt == "none" else f"{task}.{metric}.{filt}"
            if metric.endswith("_stderr"):
                base = metric[: -len("_stderr")]
                name = (f"{task}.{base}" if filt == "none" else f"{task}.{base}.{filt}") + "_stderr"
            if (num := _number(value)) is not None:
                flat[name] = num
    for task, n in results.get("n-samples", {}).items():
        flat[f"{task}.n"] = int(n.get("effective", n.get("original", 0)))
    return flat


def run_harness(model, adapter, tokenizer, tasks: Sequence[str], *, limit: int | float | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, mc_num: int = 128, gen_length: int = 256,
                steps: int = 256, block_length: int | None = 32, remasking: str = "auto", seed: int = 1234,
                include_path: str | os.PathLike | None = None, bootstrap_iters: int = 1000,
                progress: bool = True, return_raw: bool = False, gen_options: dict | None = None,
                likelihood: str = "auto") -> dict:
    """Evaluate ``model`` on lm-eval ``tasks``; returns flat metrics (see the module docstring).

    ``gen_length`` is the generation budget of both kinds of model: the dLLM's fixed answer
    length, and ``max_gen_toks`` for AR models (overriding the task's). ``include_path`` adds
    a directory of further task YAMLs. All of Python's, NumPy's and torch's seeds (and the
    few-shot sampler's) are set from ``seed``. ``gen_options``: further dLLM sampler keywords
    (schedule, alg, alg_temp, top_p, top_k, cfg, temperature; see :class:`DiffusionLM`)."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_harness: no tasks given")
    with offline_defaults():
        return _run_harness(model, adapter, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot,
                            batch_size=batch_size, mc_num=mc_num, gen_length=gen_length, steps=steps,
                            block_length=block_length, remasking=remasking, seed=seed, include_path=include_path,
                            bootstrap_iters=bootstrap_iters, progress=progress, return_raw=return_raw,
                            gen_options=gen_options, likelihood=likelihood)


def _run_harness(model, adapter, tokenizer, tasks, *, limit, num_fewshot, batch_size, mc_num, gen_length, steps,
                 block_length, remasking, seed, include_path, bootstrap_iters, progress, return_raw,
                 gen_options=None, likelihood="auto") -> dict:
    import lm_eval

    _quiet_lm_eval()
    lm = make_lm(model, adapter, tokenizer, batch_size=batch_size, mc_num=mc_num, gen_length=gen_length, steps=steps,
                 block_length=block_length, remasking=remasking, seed=seed, progress=progress,
                 gen_options=gen_options if adapter.objective == "mdm" else None, likelihood=likelihood)
    was_training = model.training
    model.eval()
    try:
        local = local_tasks(include_path)
        with task_index(tasks, include_path, local) as manager:
            unknown = [t for t in tasks if t not in manager.all_tasks]
            if unknown:
                raise ValueError(f"unknown lm-eval task(s) {unknown}; the offline tasks are {sorted(local)}")
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                gen_kwargs=None if adapter.objective == "mdm" else {"max_gen_toks": gen_length},
                bootstrap_iters=bootstrap_iters, log_samples=False, confirm_run_unsafe_code=True,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    return out if return_raw else flatten_results(out)


def local_tasks(include_path=None) -> set[str]:
    """The shipped offline tasks and those of ``include_path``'s YAMLs."""
    local = set(local_task_names())
    if include_path:
        local |= set(local_task_names(Path(include_path).expanduser()))
    return local


@contextlib.contextmanager
def task_index(tasks, include_path=None, local: set[str] | None = None):
    """lm-eval's ``TaskManager`` over the shipped tasks, ``include_path``'s and, unless every one of ``tasks`` is
    local, lm-eval's own library (a scan of seconds); the task files live until the block ends. ``local``: the
    caller's :func:`local_tasks` (else scanned here)."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="freeact_tasks_") as tmp:
        paths = [str(materialize_tasks(Path(tmp) / "freeact"))]
        if include_path:
            paths.append(str(materialize_tasks(Path(tmp) / "user", Path(include_path).expanduser())))
        local = local_tasks(include_path) if local is None else local
        yield TaskManager(include_path=paths, include_defaults=not set(tasks) <= local)


def check_task_names(ecfg) -> None:
    """Raise ValueError, with the near misses, for a task of ``ecfg.tasks`` that lm-eval does not know (checked
    once, by :func:`freeact.validate.validate`, before the model loads)."""
    tasks, inc = list(_opt(ecfg, "tasks") or []), _opt(ecfg, "include_path")
    local = local_tasks(inc)
    if set(tasks) <= local:
        return
    _quiet_lm_eval()
    with offline_defaults(), task_index(tasks, inc, local) as manager:
        known = list(manager.all_tasks)
    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=3, cutoff=0.6)
            raise ValueError(f"task {t!r} is not in lm-eval" + (f" (did you mean {', '.join(near)}?)" if near else
                                                               f"; the offline tasks are {sorted(local)}"))


def _quiet_lm_eval() -> None:
    """lm-eval's own loggers at WARNING (its INFO lines would bury the run's output)."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _opt(ecfg, key: str, default=None):
    return getattr(ecfg, key, default)


def check_task_settings(ecfg) -> None:
    """Raise ValueError on task settings of an ``eval`` config that cannot run (checked before
    any compute by :func:`freeact.validate.validate`)."""
    from .sampling import REMASKING, SCHEDULES, check_sampling, check_schedule

    tasks = list(_opt(ecfg, "tasks") or [])
    if not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks={tasks} must be a list of lm-eval task names")
    limit, shots = _opt(ecfg, "limit"), _opt(ecfg, "num_fewshot")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or null for all documents)")
    if shots is not None and shots < 0:
        raise ValueError(f"num_fewshot={shots} must be >= 0 (or null for the task's default)")
    if _opt(ecfg, "batch_size", 1) < 1:
        raise ValueError(f"batch_size={ecfg.batch_size} must be >= 1")
    if _opt(ecfg, "remasking", "auto") not in REMASKING:
        raise ValueError(f"remasking={ecfg.remasking!r} must be one of {REMASKING}")
    check_schedule(_opt(ecfg, "gen_length", 256), _opt(ecfg, "steps", 256), _opt(ecfg, "block_length", 32))
    if _opt(ecfg, "schedule", "auto") not in SCHEDULES:
        raise ValueError(f"schedule={ecfg.schedule!r} must be one of {SCHEDULES}")
    g = gen_options(ecfg)
    check_sampling(g["alg"], g["alg_temp"], g["top_p"], g["top_k"], g["cfg"], g["temperature"])
    if _opt(ecfg, "likelihood", "auto") not in ("auto", "llada", "dream"):
        raise ValueError(f"likelihood={ecfg.likelihood!r} must be auto, llada or dream")
    inc = _opt(ecfg, "include_path")
    if inc and not Path(inc).expanduser().is_dir():
        raise ValueError(f"include_path={inc} is not a directory")


def gen_options(ecfg) -> dict:
    """The dLLM sampler keys of an ``eval`` config (issue 14), with their defaults."""
    return {"schedule": _opt(ecfg, "schedule", "auto"), "alg": _opt(ecfg, "alg", "entropy"),
            "alg_temp": _opt(ecfg, "alg_temp"), "top_p": _opt(ecfg, "top_p"), "top_k": _opt(ecfg, "top_k"),
            "cfg": float(_opt(ecfg, "cfg", 0.0) or 0.0), "temperature": _opt(ecfg, "temperature")}


def run_harness_config(model, adapter, tokenizer, ecfg, progress: bool = True) -> dict:
    """:func:`run_harness` with the keys of an ``eval`` config (``conf/eval/harness.yaml``)."""
    check_task_settings(ecfg)
    return run_harness(model, adapter, tokenizer, list(ecfg.tasks), limit=_opt(ecfg, "limit"),
                       num_fewshot=_opt(ecfg, "num_fewshot"), batch_size=ecfg.batch_size, mc_num=ecfg.mc_num,
                       gen_length=_opt(ecfg, "gen_length", 256), steps=_opt(ecfg, "steps", 256),
                       block_length=_opt(ecfg, "block_length", 32), remasking=_opt(ecfg, "remasking", "auto"),
                       seed=ecfg.seed, include_path=_opt(ecfg, "include_path"), progress=progress,
                       gen_options=gen_options(ecfg), likelihood=_opt(ecfg, "likelihood", "auto"))
