"""Run lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, PyPI ``lmms-eval``) on an
in-memory, possibly quantized, vision-language model.

:class:`FreeactLMMS` is an lmms-eval model ("simple" kind: a text context plus the task's
``doc_to_visual`` images) that wraps the model object and its processor, so a model quantized by
freeact is evaluated as it is in memory; prompts use the processor's chat template with the
images first, as lmms-eval's own Qwen2.5-VL / InternVL wrappers do. :func:`local_tasks` defines
tasks on a local JSONL folder (``freeact.data.vqa_records`` format) with no download;
:func:`run_lmms_eval` runs any task list and returns flat ``{task.metric: value}``.

From the command line, ``eval=lmms`` (``conf/eval/lmms.yaml``) runs :func:`run_lmms_config`: lmms-eval task
names (its own library, or the YAMLs of ``eval.include_path``) and/or local records (``eval.source``), each
metric a ``<task>.<metric>`` column of the run's row::

    python -m freeact.run model=tiny_vlm method=rtn calib=mm_synthetic eval=lmms \
        eval.include_path=my_tasks eval.include_defaults=false eval.tasks=[my_vqa]

Installing lmms-eval
--------------------
``pip install lmms-eval`` (0.7.3) pulls in a different torch (and CUDA wheels, torchvision,
wandb, ...). In an environment whose torch / transformers must stay as they are, install it
without its dependency set, and the two packages its evaluator imports beyond ours through the
``lmms`` extra::

    pip install -e ".[lmms]"
    pip install --no-deps lmms-eval==0.7.3

That is enough for the evaluator, local tasks and metrics; a real suite's own ``utils.py`` may
import more (e.g. ``pycocoevalcap`` for captioning), which ``pip install --no-deps`` adds as needed.
This module imports lmms-eval only when called; :func:`lmms_available` tells whether it can.

Running a real suite (README snippet)
-------------------------------------
Quantize as a normal run does, keep the model in memory, then hand it to lmms-eval. The
suite's data must be reachable: a Hugging Face cache that holds its ``dataset_path`` (then set
``HF_DATASETS_OFFLINE=1``), or network access; a local copy in another format can be given as
a task YAML directory through ``include_path``::

    from hydra import compose, initialize_config_dir
    from freeact.validate import validate
    from freeact.eval.lmms_bridge import run_lmms_eval
    from freeact.experiment import load_model_processor, run_experiment
    from freeact.methods import method_names

    with initialize_config_dir(config_dir="/abs/path/to/freeact/conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=qwen2_5_vl_7b", "method=quarot", "quant=w4a4",
                                           "calib=mm_synthetic", "eval=mm_synthetic"])
    row, model = run_experiment(cfg, validate(cfg), run_hash="lmms")  # quantized
    metrics = run_lmms_eval(model, load_model_processor(cfg.model),
                            tasks=["textvqa_val", "docvqa_val", "chartqa", "mmbench_en_dev"],
                            device="cuda", batch_size=8, max_new_tokens=32)

``tasks`` are lmms-eval task names (``python -m lmms_eval --tasks list``); ``limit=N`` takes the
first N documents of each. Offline, on the synthetic set or any JSONL folder::

    from freeact.data.vqa_sources import generate_synthetic_vqa
    folder = generate_synthetic_vqa("/tmp/vqa", n=48, seed=0)
    metrics = run_lmms_eval(model, processor, tasks=local_tasks(folder), include_defaults=False)

which reports ``freeact_vqa_open.vqa_acc``, ``freeact_vqa_text.anls`` (greedy answers) and
``freeact_vqa_mc.acc`` (option log-likelihoods), with the same metric code and prompts as
:mod:`freeact.eval.multimodal`, so both paths give the same numbers.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.processor import encode_prompts, to_device, tokenizer_of
from ..data.vqa_records import load_image, load_records
from ..data.vqa_sources import resolve_source
from .multimodal import anls, continuation_logprobs, references, vqa_accuracy

#: local task per record type: (name, output type, metric)
LOCAL_TASKS = {"open": ("freeact_vqa_open", "generate_until", "vqa_acc"),
               "text": ("freeact_vqa_text", "generate_until", "anls"),
               "mc": ("freeact_vqa_mc", "multiple_choice", "acc")}


def lmms_available() -> bool:
    """Whether lmms-eval's evaluator imports here (see the module docstring to install it)."""
    if importlib.util.find_spec("lmms_eval") is None:
        return False
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError:
        return False
    return True


LMMS_INSTALL = 'pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3'


def _require_lmms():
    if not lmms_available():
        raise ImportError(f"lmms-eval is not importable: {LMMS_INSTALL} (see freeact/eval/lmms_bridge.py)")


@contextmanager
def quiet_lmms(progress: bool = True):
    """lmms-eval logs through loguru from DEBUG up (hundreds of lines while it indexes its task library):
    its messages are switched off while it runs here, and on again afterwards (its errors still raise);
    with ``progress`` false, so are the progress bars of ``datasets`` (which loads the tasks' documents)."""
    from datasets.utils import logging as ds_logging
    from loguru import logger

    bars = ds_logging.is_progress_bar_enabled()
    logger.disable("lmms_eval")
    if not progress:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.enable("lmms_eval")
        if bars:
            ds_logging.enable_progress_bar()


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool):
    """lmms-eval's task index (its own library unless ``include_defaults`` is false, plus the YAMLs under
    ``include_path``), built once per process: indexing the library takes seconds, and a run asks for it twice
    (the config check, then the evaluation)."""
    _require_lmms()
    from lmms_eval.tasks import TaskManager

    with quiet_lmms():
        return TaskManager("WARNING", include_path=include_path, include_defaults=include_defaults)


# -- the model ----------------------------------------------------------------------------------
def _model_class():
    """The lmms-eval model class (defined on first use: lmms-eval is optional)."""
    from lmms_eval.api.model import lmms

    class FreeactLMMS(lmms):
        """An in-memory VLM + its processor as an lmms-eval model (greedy generation)."""

        is_simple = True

        def __init__(self, model, processor, batch_size: int = 8, max_new_tokens: int = 32, device="cpu",
                     progress: bool = True):
            super().__init__()
            self.model, self.processor = model.eval(), processor
            self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
            self.device, self.progress = device, progress

        def _record(self, context, doc_to_visual, doc_id, task, split) -> dict:
            visuals = (doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None) or []
            return {"image": [v if not isinstance(v, (str, Path)) else load_image(v) for v in visuals],
                    "prompt": context, "id": f"{task}/{doc_id}"}

        def loglikelihood(self, requests):
            """``(loss, is_greedy)`` per request, the loss being the continuation's summed negative
            log-likelihood: lmms-eval 0.7's models return a loss here and its multiple-choice
            scoring takes the argmin. Each pair is wrapped in a ``GenerationResult``: 0.7.3's
            evaluator turns any other tuple into its ``str``."""
            from lmms_eval.api.instance import GenerationResult

            rows = []
            for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
                if callable(target):
                    target = target(self.task_dict[task][split][doc_id])
                rows.append((self._record(context, doc_to_visual, doc_id, task, split), str(target)))
            out = []
            for i in tqdm(range(0, len(rows), self.batch_size), desc="lmms loglikelihood",
                          disable=not self.progress, leave=False):
                chunk = rows[i : i + self.batch_size]
                res = continuation_logprobs(self.model, self.processor, [r for r, _ in chunk],
                                            [c for _, c in chunk], self.device)
                out += [GenerationResult((-lp, greedy)) for lp, _, greedy in res]
            return out

        @torch.no_grad()
        def generate_until(self, requests):
            """Greedy answers, batched among requests with the same generation settings."""
            tok = tokenizer_of(self.processor)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            args = [r.args for r in requests]
            groups: dict[str, list[int]] = {}
            for i, a in enumerate(args):
                groups.setdefault(json.dumps(a[1] or {}, sort_keys=True, default=str), []).append(i)
            out = [None] * len(args)
            bar = tqdm(total=len(args), desc="lmms generate", disable=not self.progress, leave=False)
            for idx in groups.values():
                gen = dict(args[idx[0]][1] or {})
                until = gen.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                for j in range(0, len(idx), self.batch_size):
                    chunk = idx[j : j + self.batch_size]
                    records = [self._record(c, v, d, t, s) for c, _, v, d, t, s in (args[i] for i in chunk)]
                    batch = encode_prompts(self.processor, records, padding_side="left")
                    ids = self.model.generate(**to_device(batch, self.device), do_sample=False, pad_token_id=pad,
                                              max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)))
                    texts = tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                    for i, text in zip(chunk, texts):
                        for stop in until:
                            text = text.split(stop)[0] if stop else text
                        out[i] = text.strip()
                    bar.update(len(chunk))
            bar.close()
            return out

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("multi-round generation is not supported by the freeact bridge")

    return FreeactLMMS


def make_lmms_model(model, processor, **kwargs):
    """An lmms-eval model object for ``model`` (kwargs: batch_size, max_new_tokens, device, progress)."""
    _require_lmms()
    return _model_class()(model, processor, **kwargs)


# -- local tasks ------------------------------------------------------------------------------
def _doc_to_visual(doc):
    return [load_image(doc["image"])]


def _doc_to_text(doc):
    return doc["prompt"]


def _open_results(doc, results):
    return {"vqa_acc": vqa_accuracy(results[0].split("\n")[0].strip(), references(doc))}


def _text_results(doc, results):
    return {"anls": anls(results[0].split("\n")[0].strip(), references(doc))}


def local_tasks(folder, max_new_tokens: int = 8) -> list[dict]:
    """lmms-eval task configs over a local JSONL folder, one per record type present:
    ``freeact_vqa_open`` (greedy answers, VQA accuracy), ``freeact_vqa_text`` (greedy answers,
    ANLS) and ``freeact_vqa_mc`` (accuracy of the most likely option). Image paths are made
    absolute, as :func:`freeact.data.vqa_records.load_records` does."""
    records = load_records(folder)
    data_file = str(Path(folder) / "data.jsonl") if Path(folder).is_dir() else str(folder)
    root = Path(data_file).parent

    def of_type(kind):
        def process(ds):
            ds = ds.filter(lambda d: (d.get("type") or "open") == kind)
            return ds.map(lambda d: {"image": str(root / d["image"])})  # absolute stays absolute
        return process

    tasks = []
    for kind in sorted({r["type"] for r in records}):
        name, output_type, metric = LOCAL_TASKS[kind]
        task = dict(task=name, output_type=output_type, dataset_path="json",
                    dataset_kwargs={"data_files": {"test": data_file}}, test_split="test",
                    process_docs=of_type(kind), doc_to_visual=_doc_to_visual, doc_to_text=_doc_to_text,
                    doc_to_target="answer",
                    metric_list=[{"metric": metric, "aggregation": "mean", "higher_is_better": True}])
        if kind == "mc":
            task.update(doc_to_choice="options", doc_to_target=lambda d: d["options"].index(d["answer"]),
                        target_delimiter="")
        else:
            task.update(process_results=_open_results if kind == "open" else _text_results,
                        generation_kwargs={"until": ["\n"], "max_new_tokens": max_new_tokens})
        tasks.append(task)
    return tasks


# -- running ----------------------------------------------------------------------------------
def _prepare_tasks(lm, task_dict: dict, seed: int) -> None:
    """What ``lmms_eval.evaluator.simple_evaluate`` does to the tasks before ``evaluate``: the
    model gets each task's dataset (``doc_to_visual`` reads documents from it), zero-shot unless
    the task says otherwise, seeded few-shot sampling. (``simple_evaluate`` itself is not used:
    in 0.7.3 it patches ``filelock._api``, which filelock 4 no longer has.) A task given as a
    config dict loses its name in 0.7.3's ``TaskManager`` (``config.task`` is None), which the
    requests then carry: it is put back here."""
    for name, task in task_dict.items():
        if isinstance(task, dict):
            _prepare_tasks(lm, task, seed)
            continue
        if isinstance(task, tuple):
            task = task[1]
            if task is None:
                continue
        if task.config.task is None:
            task.config.task = name
        lm.task_dict[name] = task.dataset
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def run_lmms_eval(model, processor, tasks: list, limit: int | None = None, batch_size: int = 8,
                  max_new_tokens: int = 32, device="cpu", include_path: str | None = None,
                  include_defaults: bool = True, progress: bool = True, seed: int = 1234) -> dict:
    """Evaluate ``model`` on lmms-eval ``tasks`` (names and/or config dicts such as
    :func:`local_tasks`); returns ``{"<task>.<metric>": value}`` (stderr entries dropped)."""
    _require_lmms()
    import random

    import numpy as np
    from lmms_eval.evaluator import evaluate
    from lmms_eval.tasks import get_task_dict

    lm = make_lmms_model(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                         progress=progress)
    manager = task_manager(include_path, include_defaults)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with quiet_lmms(progress):
        task_dict = get_task_dict(list(tasks), manager, "simple")
        _prepare_tasks(lm, task_dict, seed)
        res = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False,
                       verbosity="WARNING", process_docs_parallel=1)
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if "stderr" in name or not isinstance(value, (int, float)) or name == "alias":
                continue
            out[f"{task}.{name}"] = value
    return out


# -- the eval=lmms config ---------------------------------------------------------------------------
def _index_of(ecfg) -> tuple[str | None, bool]:
    """``(include_path resolved, include_defaults)`` of an ``eval=lmms`` config: the key of its task index."""
    inc = ecfg.get("include_path")
    return (str(Path(inc).expanduser().resolve()) if inc else None), bool(ecfg.get("include_defaults", True))


def check_lmms_settings(ecfg) -> None:
    """Raise ValueError on settings of an ``eval=lmms`` config that cannot run, before the model loads: the
    values first, then whether lmms-eval imports, then the task names against its index (``include_path``'s
    YAMLs, and its own library unless ``include_defaults`` is false). Whether each task's documents load is
    :func:`check_task_data` (the config check runs both; the evaluation, after it, only this one)."""
    tasks = list(ecfg.get("tasks") or [])
    if not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks={tasks} must be a list of lmms-eval task names")
    if not tasks and not ecfg.get("source"):
        raise ValueError("nothing to evaluate: give eval.tasks=[...] (lmms-eval task names) and/or eval.source="
                         "<a JSONL records folder | synthetic | easy_vqa/test>")
    limit = ecfg.get("limit")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or null for all documents)")
    for key in ("batch_size", "max_new_tokens"):
        if ecfg.get(key) is None or ecfg.get(key) < 1:
            raise ValueError(f"{key}={ecfg.get(key)} must be >= 1")
    inc = ecfg.get("include_path")
    if inc and not Path(inc).expanduser().is_dir():
        raise ValueError(f"include_path={inc} is not a directory")
    if tasks and not inc and not ecfg.get("include_defaults", True):
        raise ValueError("include_defaults=false leaves only the tasks of include_path, and none is given")
    if not lmms_available():
        raise ValueError(f"eval=lmms needs lmms-eval: {LMMS_INSTALL}")
    if tasks:
        inc, defaults = _index_of(ecfg)
        known = task_manager(inc, defaults).all_tasks
        where = (f"include_path={inc}" + (" or lmms-eval" if defaults else "")) if inc else "lmms-eval"
        for t in tasks:
            if t not in known:
                near = difflib.get_close_matches(t, known, n=3)
                also = f" (did you mean {', '.join(near)}?)" if near else ""
                raise ValueError(f"task {t!r} is not in {where}{also}")


def check_task_data(ecfg) -> None:
    """Build each named task of an ``eval=lmms`` config as the evaluation will (its documents loaded by
    ``datasets``), so that data missing offline fails before the model loads, as one line naming the task and
    the cause. The evaluation builds them again: from the cache, which this leaves filled."""
    from lmms_eval.tasks import get_task_dict

    tasks = list(ecfg.get("tasks") or [])
    if not tasks:  # records alone: no index to build
        return
    manager = task_manager(*_index_of(ecfg))
    for task in tasks:
        try:
            with quiet_lmms(progress=False):
                get_task_dict([task], manager, "simple")
        except Exception as e:  # lmms-eval wraps the cause (tenacity's RetryError around a ConnectionError, ...)
            cause = _root_cause(e)
            offline = (isinstance(cause, ConnectionError)
                       or any(w in str(cause).lower() for w in ("offline", "not cached")))
            hint = ("; offline, its dataset must be in the Hugging Face cache (load it once where there is a "
                    "network) or be given as a local task YAML under eval.include_path" if offline else "")
            raise ValueError(f"task {task!r} cannot load its documents: {type(cause).__name__}: "
                             f"{' '.join(str(cause).split())[:300]}{hint}") from None


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain, through tenacity's ``RetryError`` (its last attempt's exception)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        last = getattr(e, "last_attempt", None)
        inner = last.exception() if last is not None and hasattr(last, "exception") else None
        inner = inner or e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    return e


def run_lmms_config(model, processor, ecfg, device="cpu", progress: bool = True) -> dict:
    """:func:`run_lmms_eval` with the keys of an ``eval=lmms`` config: the named tasks plus, when ``source``
    is set, its records as :func:`local_tasks`; ``{"<task>.<metric>": value}``."""
    check_lmms_settings(ecfg)
    named = list(ecfg.get("tasks") or [])
    tasks: list = list(named)
    if ecfg.get("source"):
        folder = resolve_source(ecfg.source, ecfg.get("nsamples"), ecfg.seed)
        tasks += local_tasks(folder, max_new_tokens=ecfg.max_new_tokens)
    inc, defaults = _index_of(ecfg)
    return run_lmms_eval(model, processor, tasks, limit=ecfg.get("limit"), batch_size=ecfg.batch_size,
                         max_new_tokens=ecfg.max_new_tokens, device=device, include_path=inc,
                         include_defaults=bool(named) and defaults, progress=progress, seed=ecfg.seed)
