"""Measurements on a model's activations: outliers and spectra per token type, per-layer error.

* :func:`activation_stats` (batches: token ids, or a VLM's processor dicts; padded positions
  are left out) hooks every block linear's input (the tensor the weight multiplies,
  i.e. after any installed online transform) and reports, per linear and per token type,
  mean |x|, the max/median ratio of per-channel magnitudes (the outlier measure used in the
  quantization literature), kurtosis, and the eigenvalue spectrum of the input covariance
  (how rank-deficient each type's activations are: FreeAct's premise).
* :func:`block_output_error` compares two models block by block on the same inputs
  (full-precision vs quantized): relative MSE of each decoder layer's output.
"""
from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from .models.token_types import TokenTypes


@torch.no_grad()
def activation_stats(model, adapter, batches, token_types: TokenTypes | None = None, spectra: bool = False,
                     include_all: bool = False):
    """Returns a DataFrame (one row per layer x linear x type; type ``"all"`` = every token, always
    present without ``token_types`` and added by ``include_all``) and, if ``spectra``, a dict
    ``{(layer, linear, type): eigenvalues (descending, float64)}``."""
    names = token_types.names if token_types is not None else []
    if token_types is None or include_all:
        names = names + ["all"]
    absmax = defaultdict(lambda: None)  # (layer, lin, type) -> per-channel max |x|
    sums = defaultdict(float)
    counts = defaultdict(int)
    m4 = defaultdict(float)
    m2 = defaultdict(float)
    cov = defaultdict(lambda: None)
    current = {}
    hooks = []
    for i, block in enumerate(adapter.blocks()):
        for lname, lin in block.linears().items():
            def hook(mod, args, out, key=(i, lname)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                t = current.get("types")
                keep = current.get("keep")
                if keep is not None:  # padding is not a token of any type
                    x = x[keep]
                    t = None if t is None else t.reshape(-1)[keep]
                for ti, tname in enumerate(names):
                    xs = x if (t is None or tname == "all") else x[t.reshape(-1) == ti]
                    if xs.numel() == 0:
                        continue
                    k = key + (tname,)
                    amax = xs.abs().amax(0)
                    absmax[k] = amax if absmax[k] is None else torch.maximum(absmax[k], amax)
                    sums[k] += xs.abs().sum().item()
                    counts[k] += xs.numel()
                    m2[k] += xs.pow(2).sum().item()
                    m4[k] += xs.pow(4).sum().item()
                    if spectra:
                        c = xs.T @ xs
                        cov[k] = c if cov[k] is None else cov[k] + c
            hooks.append(lin.register_forward_hook(hook))
    try:
        for batch in batches:
            kw = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}  # a VLM batch: processor dict
            mask = kw.get("attention_mask")
            current["keep"] = None if mask is None else mask.reshape(-1).bool()
            current["types"] = token_types.compute(kw["input_ids"]) if token_types is not None else None
            model(**kw, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for k, amax in absmax.items():
        n = counts[k]
        var = m2[k] / n
        med = amax.median().item()
        rows.append({"layer": k[0], "linear": k[1], "type": k[2], "tokens": n // amax.numel(),
                     "mean_abs": sums[k] / n, "max_over_median": amax.max().item() / max(med, 1e-12),
                     "max": amax.max().item(), "median": med, "top_channel": int(amax.argmax()),
                     "kurtosis": (m4[k] / n) / max(var**2, 1e-30)})
    df = pd.DataFrame(rows)
    if not spectra:
        return df
    eig = {k: torch.linalg.eigvalsh(c / max(counts[k] // c.shape[0], 1)).flip(0).clamp_min(0) for k, c in cov.items()}
    return df, eig


@torch.no_grad()
def block_output_error(ref_model, ref_adapter, model, adapter, batches) -> pd.DataFrame:
    """Relative MSE ``|y_q - y|^2 / |y|^2`` of every decoder layer's output, both models fed the
    same input ids (each model runs its own previous layers, so errors accumulate as in use)."""
    def outputs(m, a):
        outs = defaultdict(list)
        hooks = [L.register_forward_hook(lambda mod, args, out, i=i: outs[i].append(
            (out[0] if isinstance(out, (tuple, list)) else out).double())) for i, L in enumerate(a.layers())]
        try:
            for b in batches:
                m(input_ids=b, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return outs
    ref, got = outputs(ref_model, ref_adapter), outputs(model, adapter)
    rows = []
    for i in sorted(ref):
        num = sum((g - r).pow(2).sum().item() for g, r in zip(got[i], ref[i]))
        den = sum(r.pow(2).sum().item() for r in ref[i])
        rows.append({"layer": i, "rel_mse": num / den})
    return pd.DataFrame(rows)
