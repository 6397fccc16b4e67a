"""One run: load model -> calibration data -> method -> evaluation -> result row."""
from __future__ import annotations

import platform
import os
import resource
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from .data.calib import build_calib_set
from .eval import evaluate
from .methods import QuantContext, QuantSettings, get_method
from .models import get_adapter
from .models.loading import load_model, pick_device
from .models.tiny import default_tokenizer_dir
from .paths import resolve_path
from .tracking.results import flatten


def load_model_processor(mcfg):
    """A VLM's processor (tokenizer + image processor): the checkpoint's, or the shipped tiny one."""
    from .data.processor import load_processor

    path = mcfg.tokenizer or (default_tokenizer_dir(mcfg.family) if mcfg.source == "tiny" else mcfg.path)
    return load_processor(resolve_path(path))


def is_multimodal(data_cfg) -> bool:
    return data_cfg.get("kind", "text") == "multimodal"


def needs_processor(cfg: DictConfig) -> bool:
    """Whether the run feeds images: multimodal calibration or evaluation, or lmms-eval tasks."""
    return is_multimodal(cfg.calib) or cfg.eval.get("kind", "text") in ("multimodal", "lmms")


def git_commit() -> str:
    """Short commit of the code that runs (``+dirty`` with uncommitted changes to tracked files).
    ``FREEACT_GIT_COMMIT`` overrides it where the code runs from a copy without ``.git`` (a GPU
    machine that received an exported clean checkout)."""
    if os.environ.get("FREEACT_GIT_COMMIT"):
        return os.environ["FREEACT_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def calib_set(cfg: DictConfig, tok, adapter, processor=None):
    """The calibration set ``cfg.calib`` names: token windows of a text source (dLLMs: with the masking of
    ``mask_t_min/max``) or image-text records encoded by the model's ``processor`` (loaded when not given)."""
    if is_multimodal(cfg.calib):
        from .data.multimodal import build_mm_calib_set

        return build_mm_calib_set(processor or load_model_processor(cfg.model), cfg.calib.source,
                                  cfg.calib.nsamples, cfg.seed)
    return build_calib_set(tok, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed,
                           mask_token_id=adapter.mask_token_id if adapter.objective == "mdm" else None,
                           t_min=cfg.calib.mask_t_min, t_max=cfg.calib.mask_t_max,
                           text_field=cfg.calib.get("text_field") or "text")


@contextmanager
def fused_for_eval(model, kernels: str):
    """``eval.kernels``: the quantized model's input pipelines through the fused kernels while it is evaluated
    (yields how many linears; None for eager), the original ones back afterwards."""
    if kernels == "eager":
        yield None
        return
    from .kernels import input_quantizers_fused

    with input_quantizers_fused(model, backend=kernels) as n:
        yield n


def run_experiment(cfg: DictConfig, specs: dict, run_hash: str) -> tuple[dict, object]:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, tok = load_model(cfg.model, device, seed=cfg.seed)
    adapter = get_adapter(model)
    method = get_method(cfg.method.name, OmegaConf.to_container(cfg.method))
    processor = load_model_processor(cfg.model) if needs_processor(cfg) else None

    calib = None
    t_calib = time.time()
    if method.quantizes:
        calib = calib_set(cfg, tok, adapter, processor)
        ctx = QuantContext(model, adapter, QuantSettings(**specs), calib, device=device,
                           batch_size=cfg.calib.batch_size, seed=cfg.seed, progress=cfg.progress)
        info = method.apply(ctx)
        if cfg.model.get("quantize_vision"):
            from .methods.vision import quantize_vision_rtn

            info.update(quantize_vision_rtn(adapter, ctx.quant))
    else:
        info = {}
    t_quant = time.time() - t_calib
    kernels = cfg.eval.get("kernels", "eager")
    with fused_for_eval(model, kernels if method.quantizes else "eager") as n_fused:
        if n_fused is not None:
            info["fused_input_quantizers"] = n_fused
        if is_multimodal(cfg.eval):
            from .eval.multimodal import evaluate_multimodal

            metrics = evaluate_multimodal(model, processor, cfg.eval, device=device, progress=cfg.progress)
        elif cfg.eval.kind == "lmms":
            from .eval.lmms_bridge import run_lmms_config

            metrics = run_lmms_config(model, processor, cfg.eval, device=device, progress=cfg.progress)
        else:
            metrics = evaluate(model, adapter, tok, cfg.eval, device=device, progress=cfg.progress)
    row = {
        "run_hash": run_hash,
        "status": "ok",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **flatten(cfg),
        **{f"info.{k}": v for k, v in info.items()},
        **metrics,
        "quant_seconds": round(t_quant, 3),
        "wall_seconds": round(time.time() - t0, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
    }
    return row, model
