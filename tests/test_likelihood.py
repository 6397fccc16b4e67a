"""dLLM likelihood options of issue 14: classifier-free guidance and Dream's estimator."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freeact.eval.diffusion_lm import DiffusionLM, request_seed
from freeact.eval.elbo import bernoulli_masks, masked_token_nll, stratified_masks
from freeact.models import get_adapter
from conftest import conf_model

REPO = Path(__file__).resolve().parent.parent
PAIR = ("Bees collect nectar and", " make honey")


@pytest.fixture(scope="module")
def llada(tokenizer):
    return conf_model("tiny_llada", tokenizer, torch.float64)


@pytest.fixture(scope="module")
def dream(tokenizer):
    return conf_model("tiny_dream", tokenizer, torch.float64)


def dllm(model, tokenizer, **kw):
    return DiffusionLM(model, get_adapter(model), tokenizer, progress=False, check_greedy=False, **kw)


def ll(lm, pair=PAIR):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0)])[0][0]


def full_logits(model, ids):
    """Logits scoring each position (Dream: the previous position's output), full forward."""
    return get_adapter(model).logits(model(input_ids=ids[None]))[0]


# -- classifier-free guidance ---------------------------------------------------------------
def test_cfg_zero_is_todays_estimate_and_cfg_matches_the_formula(llada, tokenizer):
    mc, cfg = 6, 0.5
    lm0 = dllm(llada, tokenizer, mc_num=mc, seed=3)
    ctx, cont = lm0.encode_pair(*PAIR)
    assert len(cont) >= 2
    ids = torch.tensor(ctx + cont)
    target = torch.arange(len(ids)) >= len(ctx)
    gen = lambda: torch.Generator().manual_seed(request_seed(3, ctx, cont))  # noqa: E731
    # today's path: stratified masks, two-element rows, no guidance
    masks, p = stratified_masks(target, mc, gen())
    rows = [(ids, m) for m in masks]
    today = -sum(ce.sum().item() / pj for (ce, _), pj in zip(masked_token_nll(llada, get_adapter(llada), rows),
                                                            p.tolist())) / mc
    assert ll(lm0) == today  # exactly, not approximately
    assert ll(dllm(llada, tokenizer, mc_num=mc, seed=3, cfg=0.0)) == today

    # reference of the published rule, written out: full logits of the conditional and the
    # prompt-masked input, un + (cfg + 1)(cond - un), CE on the masked answer tokens / p_mask
    mask_id = llada.config.mask_token_id
    ref = 0.0
    for m, pj in zip(masks, p.tolist()):
        cond_in = torch.where(m, mask_id, ids)
        un_in = torch.where(m | ~target, mask_id, ids)
        with torch.no_grad():
            cond, un = full_logits(llada, cond_in), full_logits(llada, un_in)
        guided = un + (cfg + 1) * (cond - un)
        ref += F.cross_entropy(guided[m], ids[m], reduction="sum").item() / pj
    ref = -ref / mc
    got = ll(dllm(llada, tokenizer, mc_num=mc, seed=3, cfg=cfg))
    assert got == pytest.approx(ref, rel=1e-6)  # float32 CE inside
    assert abs(got - today) > 1e-3  # guidance changes the score


def test_cfg_with_dream_estimator_and_shifted_logits(dream, tokenizer):
    """Guidance on Dream: same formula through the shifted logits; bad values are refused."""
    a, b = ll(dllm(dream, tokenizer, mc_num=8, seed=1)), ll(dllm(dream, tokenizer, mc_num=8, seed=1, cfg=2.0))
    assert np.isfinite(b) and a != b
    with pytest.raises(ValueError, match="cfg"):
        dllm(dream, tokenizer, cfg=-1)
    with pytest.raises(ValueError, match="likelihood"):
        dllm(dream, tokenizer, likelihood="bogus")


# -- Dream's estimator ----------------------------------------------------------------------
def test_family_defaults_and_dream_sequence_layout(llada, dream, tokenizer, monkeypatch):
    assert dllm(llada, tokenizer).likelihood == "llada" and dllm(dream, tokenizer).likelihood == "dream"
    assert dllm(llada, tokenizer, likelihood="dream").likelihood == "dream"
    seen = {}
    import freeact.eval.diffusion_lm as mod

    real = mod.sequences_nll

    def spy(model, adapter, seqs, targets, *a, **kw):
        seen.update(seqs=seqs, targets=targets, prompts=kw["prompts"], estimator=kw["estimator"])
        return real(model, adapter, seqs, targets, *a, **kw)

    monkeypatch.setattr(mod, "sequences_nll", spy)
    lm = dllm(dream, tokenizer, mc_num=4)
    ctx, cont = lm.encode_pair(*PAIR)
    ll(lm)
    (seq,), (tgt,), (prm,) = seen["seqs"], seen["targets"], seen["prompts"]
    assert seen["estimator"] == "dream"
    assert seq.tolist() == ctx + cont + [tokenizer.eos_token_id]  # EOS appended
    assert not tgt[0] and not tgt[-1]  # first and last positions never masked
    assert tgt.nonzero().flatten().tolist() == list(range(len(ctx), len(ctx) + len(cont)))
    assert prm.nonzero().flatten().tolist() == list(range(len(ctx)))


def test_bernoulli_masks_fixed_t_pattern_frequencies():
    target = torch.tensor([False, True, True, False])
    t, eps, n = 0.3, 1e-3, 20000
    masks, p = bernoulli_masks(target, n, torch.Generator().manual_seed(0), eps, t=t)
    pm = eps + (1 - eps) * t
    assert torch.allclose(p, torch.full_like(p, pm)) and not masks[:, [0, 3]].any()
    for pat in itertools.product([0, 1], repeat=2):
        freq = (masks[:, 1:3] == torch.tensor(pat, dtype=torch.bool)).all(1).float().mean().item()
        assert freq == pytest.approx(pm ** sum(pat) * (1 - pm) ** (2 - sum(pat)), abs=0.015), pat
    ts = bernoulli_masks(target, 8, torch.Generator().manual_seed(1))[1]  # stratified: one per 1/8 bin
    bins = ((ts - eps) / (1 - eps) * 8).floor().long().sort().values
    assert bins.tolist() == list(range(8))


def _exact_dream(model, seq, answer_pos, eps, weight="p"):
    """Exact expectation of Dream's estimator: every mask M of the answer positions, with its
    probability p^|M| (1-p)^(n-|M|) integrated over t ~ U(0,1), p = eps + (1-eps) t, times
    sum_{i in M} CE_i(M) / p (``weight="count"``: the wrong LLaDA-style n/|M| instead of 1/p)."""
    n, mask_id = len(answer_pos), model.config.mask_token_id
    total = 0.0
    for bits in itertools.product([0, 1], repeat=n):
        k = sum(bits)
        if k == 0:
            continue
        m = torch.zeros(len(seq), dtype=torch.bool)
        m[[i for i, b in zip(answer_pos, bits) if b]] = True
        with torch.no_grad():
            ce = F.cross_entropy(full_logits(model, torch.where(m, mask_id, seq))[m], seq[m], reduction="sum").item()
        # integrate the polynomial in p over [eps, 1]; dt = dp / (1 - eps)
        poly = np.polynomial.Polynomial([1.0])
        poly *= np.polynomial.Polynomial([0, 1]) ** (k - 1 if weight == "p" else k)
        poly *= np.polynomial.Polynomial([1, -1]) ** (n - k)
        integ = poly.integ()
        w = (integ(1.0) - integ(eps)) / (1 - eps)
        total += ce * w * (1.0 if weight == "p" else n / k)
    return total


@pytest.mark.parametrize("answer", [" honey", " make honey", " the honey"])
def test_dream_estimator_matches_its_exact_expectation(dream, tokenizer, answer):
    lm = dllm(dream, tokenizer, mc_num=8192, batch_size=512, seed=7)
    ctx, cont = lm.encode_pair(PAIR[0], answer)
    assert 1 <= len(cont) <= 3
    seq = torch.tensor(ctx + cont + [tokenizer.eos_token_id])
    pos = list(range(len(ctx), len(ctx) + len(cont)))
    exact = _exact_dream(dream, seq, pos, 1e-3)
    wrong_w = _exact_dream(dream, seq, pos, 1e-3, weight="count")
    mc = -ll(lm, (PAIR[0], answer))
    tol = 0.05 * exact  # MC noise at 8192 draws is ~1-3 %; a wrong weighting is off by 25-35 %
    assert mc == pytest.approx(exact, abs=tol), (mc, exact)
    assert abs(wrong_w - exact) > 3 * tol, (wrong_w, exact)  # the test can tell the weightings apart


# -- end to end -----------------------------------------------------------------------------
@pytest.mark.parametrize("model,overrides", [
    ("tiny_llada", ["eval=harness_llada", "eval.cfg=0.5"]),
    ("tiny_dream", ["eval=harness_dream"]),
])
def test_harness_configs_run_end_to_end(tmp_path, model, overrides):
    from freeact.tracking.results import read_rows

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [f"model={model}", "method=fp16", *overrides, "eval.text=false", "eval.tasks=[freeact_mc]",
            "eval.limit=2", "eval.mc_num=2", "eval.batch_size=8", "progress=false",
            f"results_file={tmp_path}/r.csv", f"hydra.run.dir={tmp_path}/out"]
    res = subprocess.run([sys.executable, "-m", "freeact.run", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    row = read_rows(tmp_path / "r.csv").iloc[-1]
    assert 0.0 <= row["freeact_mc.acc"] <= 1.0 and row["freeact_mc.n"] == 2


# -- full-batch logits from another callable (eval.cuda_graph) -----------------------------------
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_elbo_with_a_forward_callable_matches_the_restricted_head(name, request, tokenizer):
    """``forward`` (what GraphedForward serves on a GPU) gives full-batch logits, aligned by the adapter and
    indexed at the masks: the same scores as the restricted head, shifted logits (Dream) included; the
    callable is used for every batch (equal-length chunks: no padding)."""
    from freeact.eval.elbo import elbo

    model = request.getfixturevalue(name)
    adapter = get_adapter(model)
    ids = tokenizer("The river runs to the sea, and the sea is never full.", return_tensors="pt").input_ids[0]
    calls = []

    def forward(x):
        calls.append(tuple(x.shape))
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits

    want = elbo(model, adapter, ids, seqlen=6, mc_num=3, seed=5, batch_size=2, progress=False)
    got = elbo(model, adapter, ids, seqlen=6, mc_num=3, seed=5, batch_size=2, progress=False, forward=forward)
    assert calls and set(calls) <= {(2, 6), (1, 6)}
    assert got["eval_tokens"] == want["eval_tokens"]
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-12)
