"""Measurements on a model's activations: outliers and spectra per token type, per-layer error.

* :func:`activation_stats` (batches: token ids, or a VLM's processor dicts; padded positions
  are left out) hooks every block linear's input (the tensor the weight multiplies,
  i.e. after any installed online transform) and reports, per linear and per token type,
  mean |x|, the max/median ratio of per-channel magnitudes (the outlier measure used in the
  quantization literature), kurtosis, and the eigenvalue spectrum of the input covariance
  (how rank-deficient each type's activations are: FreeAct's premise).
* :func:`block_output_error` compares two models block by block on the same inputs
  (full-precision vs quantized): relative MSE of each decoder layer's output.
* :func:`premise_stats` measures FreeAct's premise (issue 12, item 4) at the four sites FreeAct
  transforms, per layer and token type, on the statistics FreeAct itself is initialised from
  (block-wise full-precision pass, :class:`~freeact.transforms.typed.TypeCovariance`):
  effective ranks, the least energy the other types can have on an ``r = d/32`` block
  (:func:`premise_rows`), principal angles between the types' top subspaces.
* :func:`logged_energies` turns the per-layer energies / errors that FreeAct runs log into the
  result CSV (``info.layer{i}.{site}.energy_init.{type}`` ...) into one long table.
"""
from __future__ import annotations

import re
from collections import defaultdict

import pandas as pd
import torch
from tqdm.auto import tqdm

from .models.token_types import TokenTypes
from .tracking.results import read_rows


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


# ----------------------------------------------------------------------------- FreeAct's premise
PREMISE_COLUMNS = ["layer", "site", "type", "tokens", "energy_share", "eff_rank99", "eff_rank90", "d", "r", "room",
                   "angle_k", "angle_cos_min", "angle_cos_mean", "rank_deficiency"]


def _eff_rank(lam: torch.Tensor, p: float) -> int:
    """Number of leading eigenvalues (``lam`` descending, summing to 1) that hold a fraction ``p``."""
    cum = torch.cumsum(lam, 0)
    return min(int((cum < p * float(cum[-1]) - 1e-9).sum()) + 1, lam.numel())


def _eig_desc(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, V = torch.linalg.eigh(C)
    return lam.flip(0).clamp_min(0), V.flip(1)


@torch.no_grad()
def premise_rows(covs: torch.Tensor, names: list[str], counts=None, rank_ratio: float = 1 / 32) -> list[dict]:
    """The premise statistics of one site from per-type second moments ``covs`` (num_types, d, d)
    (e.g. :attr:`TypeCovariance.cov`; float64, uncentered). One dict per type:

    * ``energy_share``: the type's share of the site's total activation energy (trace);
    * ``eff_rank99`` / ``eff_rank90``: eigen-directions holding 99% / 90% of its energy;
      ``rank_deficiency = 1 - eff_rank99 / d``;
    * ``room``: the least energy fraction the OTHER types together (sum of their trace-normalised
      covariances, as :func:`~freeact.transforms.typed.typed_basis` uses) can have on any
      ``r``-dimensional subspace, ``r = round(d * rank_ratio)``: the sum of the ``r`` smallest
      eigenvalues. What a dense basis can reach for this type's unique block (0: an exact split
      exists; a random block carries about ``r / d``). NaN without another type;
    * ``angle_cos_min`` / ``angle_cos_mean``: cosines of the principal angles between this type's
      top-``angle_k`` eigenvectors and those of the other types' summed normalised covariance,
      ``angle_k = min`` of the two ``eff_rank90`` (1: the same directions, 0: orthogonal).

    A type with no tokens (or no energy) gets NaN statistics.
    """
    n, d, _ = covs.shape
    covs = covs.to(torch.float64)
    counts = [None] * n if counts is None else [int(c) for c in counts]
    r = max(1, int(round(d * rank_ratio))) if rank_ratio > 0 else 0
    traces = [float(torch.trace(C)) for C in covs]
    total = sum(traces)
    present = [tr > 0 for tr in traces]
    norm = [C / tr if p else None for C, tr, p in zip(covs, traces, present)]
    eig = [_eig_desc(C) if C is not None else None for C in norm]
    nan = float("nan")
    rows = []
    for k in range(n):
        row = {"type": names[k], "tokens": counts[k], "energy_share": traces[k] / total if total > 0 else nan,
               "d": d, "r": r, "eff_rank99": nan, "eff_rank90": nan, "room": nan, "angle_k": nan,
               "angle_cos_min": nan, "angle_cos_mean": nan, "rank_deficiency": nan}
        rows.append(row)
        if not present[k]:
            continue
        lam, V = eig[k]
        row["eff_rank99"], row["eff_rank90"] = _eff_rank(lam, 0.99), _eff_rank(lam, 0.90)
        row["rank_deficiency"] = 1 - row["eff_rank99"] / d
        others = [j for j in range(n) if j != k and present[j]]
        if not others:
            continue
        if len(others) == 1:
            lam_o, V_o = eig[others[0]]
        else:
            lam_o, V_o = _eig_desc(sum(norm[j] for j in others))
        row["room"] = float(lam_o.flip(0)[:r].sum()) if r else 0.0
        m = min(row["eff_rank90"], _eff_rank(lam_o / lam_o.sum(), 0.90))
        cos = torch.linalg.svdvals(V[:, :m].T @ V_o[:, :m]).clamp(0, 1)
        row.update(angle_k=m, angle_cos_min=float(cos.min()), angle_cos_mean=float(cos.mean()))
    return rows


@torch.no_grad()
def premise_stats(model, adapter, batches, token_types: TokenTypes, *, device="cpu", rank_ratio: float = 1 / 32,
                  progress: bool = False) -> pd.DataFrame:
    """FreeAct's premise per layer, site and token type, on the full-precision model.

    ``batches``: calibration batches as the pipeline makes them (tensors of input ids, or a VLM's
    processor dicts); positions with ``attention_mask == 0`` belong to no type. The model runs layer
    by layer as FreeAct's block-wise training does (:func:`~freeact.methods.blockwise.capture_layer0_inputs`,
    :func:`~freeact.methods.block_training.full_precision_pass`, layers in float32 when stored in
    half precision); the sites are FreeAct's: ``qkv`` (q_proj's input), ``o``, ``mlp`` (up/gate's
    input), ``down``. Columns: :data:`PREMISE_COLUMNS` (see :func:`premise_rows`).
    """
    from .methods.block_training import float_layer, full_precision_pass
    from .methods.blockwise import capture_layer0_inputs
    from .methods.flatquant import STAT_KEY

    batches = list(batches)
    n = token_types.num_types
    types = []
    for b in batches:
        kw = b if isinstance(b, dict) else {"input_ids": b}
        t = token_types.compute(kw["input_ids"].cpu())
        mask = kw.get("attention_mask")
        if mask is not None:  # padding: type index n, which TypeCovariance.add counts nowhere
            t = t.masked_fill(~mask.cpu().bool(), n)
        types.append(t.to(device))
    hidden, kwargs, _ = capture_layer0_inputs(model, adapter, batches, device)
    rows = []
    for i, block in enumerate(tqdm(adapter.blocks(), desc="premise", disable=not progress)):
        layer = block.layer
        orig, hidden, kw = float_layer(layer, hidden, kwargs)
        outs, stats = full_precision_pass(block, hidden, kw, types, token_types, n, want_cov=True, want_qk_cov=False)
        layer.to(orig)
        for site, lin in STAT_KEY.items():
            acc = stats.cov[lin]
            for row in premise_rows(acc.cov, token_types.names, acc.count.tolist(), rank_ratio):
                rows.append({"layer": i, "site": site, **row})
        hidden = outs
    return pd.DataFrame(rows, columns=PREMISE_COLUMNS)


_ENERGY_COL = re.compile(r"^info\.layer(\d+)\.([^.]+)\.(energy_init|energy_final)\.(.+)$")
_ERR_COL = re.compile(r"^info\.layer(\d+)\.err\.(.+)$")
ENERGY_COLUMNS = ["model", "method", "seed", "layer", "site", "type", "energy_init", "energy_final", "err"]


def logged_energies(runs) -> pd.DataFrame:
    """Long table of what FreeAct runs log per layer, from result rows (a DataFrame or a CSV path):
    ``info.layer{i}.{site}.energy_init.{type}`` / ``.energy_final.{type}`` (the fraction of that
    type's energy on the other types' unique blocks before / after training) and
    ``info.layer{i}.err.{type}`` (per-type relative block-output error, last epoch; repeated on every
    site of the layer). Columns: ``run_hash`` (when the rows have it), :data:`ENERGY_COLUMNS`;
    ``method`` is ``method.label`` where set, else ``method.name``. Runs without such columns give
    no rows."""
    df = runs if isinstance(runs, pd.DataFrame) else read_rows(runs)  # hashes stay text
    energy, err = [], []
    for col in df.columns:
        if m := _ENERGY_COL.match(col):
            for idx, v in pd.to_numeric(df[col], errors="coerce").dropna().items():
                energy.append((idx, int(m[1]), m[2], m[4], m[3], float(v)))
        elif m := _ERR_COL.match(col):
            for idx, v in pd.to_numeric(df[col], errors="coerce").dropna().items():
                err.append((idx, int(m[1]), m[2], float(v)))
    keys = ["row", "layer", "type"]
    e = pd.DataFrame(energy, columns=keys[:2] + ["site", "type", "kind", "value"])
    e = (e.pivot_table(index=keys + ["site"], columns="kind", values="value", aggfunc="first").reset_index()
         if len(e) else pd.DataFrame(columns=keys + ["site"]))
    for c in ("energy_init", "energy_final"):
        if c not in e:
            e[c] = float("nan")
    out = e.merge(pd.DataFrame(err, columns=keys + ["err"]), on=keys, how="outer")
    method = df["method.name"] if "method.name" in df else pd.Series(None, index=df.index, dtype=object)
    if "method.label" in df:
        method = df["method.label"].where(df["method.label"].notna(), method)
    meta = pd.DataFrame({"model": df.get("model.name"), "method": method, "seed": df.get("seed")}, index=df.index)
    ids = ["run_hash"] if "run_hash" in df else []
    for c in ids:
        meta[c] = df[c]
    out = out.join(meta, on="row")
    out = out.sort_values(["row", "layer", "site", "type"], na_position="last")
    return out[ids + ENERGY_COLUMNS].reset_index(drop=True)
