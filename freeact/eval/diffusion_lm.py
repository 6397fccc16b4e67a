"""lm-eval's ``LM`` interface for an in-memory masked-diffusion LM (LLaDA, Dream), registered as
``freeact_dllm``.

* ``loglikelihood(context, continuation)``: minus the Monte-Carlo ELBO of the continuation
  given the context (:func:`freeact.eval.elbo.sequences_nll`): only continuation tokens are
  masked, the number masked is stratified over the ``mc_num`` draws, cross-entropy on masked
  positions is divided by the masking probability. The draws of ALL requests are packed into
  shared forwards of ``batch_size`` rows. Each request's masks come from its own generator
  seeded by (``seed``, its token ids), so a score does not depend on batching, on request order
  or on which other requests are in the run.
* ``is_greedy``: whether the argmax prediction of every continuation token matches, with the
  whole continuation masked in ONE forward. (LLaDA's reference unmasks one token per forward,
  most confident first, which costs len(continuation) forwards; for one-token continuations,
  as in MMLU-style tasks, both are the same.) Only tasks reporting ``acc``-by-greedy
  (e.g. LAMBADA) read it.
* ``loglikelihood_rolling(text)``: the same ELBO over the whole text, split into windows of the
  model's context length by lm-eval's rolling-window rule (each window's tokens are the target,
  the tokens before them the condition; the first window is conditioned on the prefix token).
* ``generate_until(context, gen_kwargs)``: diffusion sampling (:mod:`freeact.eval.sampling`),
  then cut at the first EOS token and at the first of the ``until`` strings. ``gen_length``,
  ``steps`` and ``block_length`` come from this object (dLLMs generate a fixed length), not from
  the task's ``max_gen_toks``; ``temperature`` comes from this object when set, else from the
  task's ``gen_kwargs`` when ``do_sample`` is true, else decoding is greedy. ``schedule``
  (``auto``: Dream's for Dream-style models, LLaDA's otherwise), ``alg``, ``alg_temp``, ``top_p``,
  ``top_k`` and ``cfg`` (classifier-free guidance) are passed to the sampler.

Options (issue 14): ``likelihood`` picks the estimator, ``llada`` (above) or ``dream`` (Dream's own
evaluation: EOS appended to the continuation, visible and never masked; each draw masks every
continuation token independently with probability ``p = eps + (1 - eps) t``, ``t`` stratified over
the draws, ``eps = 1e-3``; cross-entropy on masked tokens divided by ``p``); ``auto`` = the
family's own (dream for Dream, llada for LLaDA). ``cfg`` > 0 adds classifier-free guidance to
the likelihood: each draw is also scored with the whole context masked (same masked answer
positions) and the logits combined ``un + (cfg + 1)(cond - un)``; 0 = none. Rolling likelihoods
use the chosen estimator without the appended EOS.

Tokenisation follows lm-eval's HFLM: trailing spaces of the context move into the continuation,
the pair is encoded as one string and split where the context's tokens end. A prefix token
(BOS, else EOS) starts every sequence, so the first scored token always has a left neighbour
(Dream's shifted logits cannot score position 0).
"""
from __future__ import annotations

import hashlib

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .elbo import ESTIMATORS, sequences_nll
from .sampling import (check_sampling, check_schedule, diffusion_generate, family_choice, resolve_remasking,
                       resolve_schedule)


def request_seed(seed: int, *token_lists) -> int:
    """A stable 63-bit seed from ``seed`` and the request's tokens."""
    h = hashlib.sha256(str(seed).encode())
    for t in token_lists:
        h.update(b"|" + ",".join(map(str, t)).encode())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def resolve_likelihood(likelihood: str | None, adapter) -> str:
    """``auto`` (or None): the family's own estimator, ``dream`` for shifted-logits models (Dream),
    else ``llada``."""
    return family_choice("likelihood", likelihood or "auto", ESTIMATORS, adapter, dream="dream", llada="llada")


@register_model("freeact_dllm")
class DiffusionLM(LM):
    """lm-eval model for a masked-diffusion LM held in memory (see the module docstring)."""

    def __init__(self, model, adapter=None, tokenizer=None, mc_num: int = 128, batch_size: int = 32,
                 gen_length: int = 256, steps: int = 256, block_length: int | None = 32, remasking: str = "auto",
                 seed: int = 1234, max_length: int | None = None, add_bos_token: bool = True,
                 check_greedy: bool = True, device: str | None = None, progress: bool = True,
                 family: str | None = None, dtype: str = "auto", schedule: str = "auto", alg: str = "entropy",
                 alg_temp: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 cfg: float = 0.0, temperature: float | None = None, trust_remote_code: bool = False,
                 likelihood: str = "auto",
                 **_ignored):
        super().__init__()
        if isinstance(model, str):  # --model freeact_dllm --model_args pretrained=...,family=llada
            from ..models.loading import load_pretrained, load_tokenizer, resolve_dtype

            if family not in ("llada", "dream"):
                raise ValueError("freeact_dllm with a checkpoint path needs family=llada or family=dream")
            dev = device or "cpu"
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=_as_bool(trust_remote_code))
            model = load_pretrained(family, model, resolve_dtype(dtype, dev),
                                    trust_remote_code=_as_bool(trust_remote_code)).to(dev).eval()
        if adapter is None:
            from ..models import get_adapter

            adapter = get_adapter(model)
        if adapter.objective != "mdm" or adapter.mask_token_id is None:
            raise TypeError(f"freeact_dllm needs a masked-diffusion LM with a mask token, got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError("freeact_dllm needs the model's tokenizer")
        if mc_num < 1 or batch_size < 1:
            raise ValueError(f"mc_num={mc_num} and batch_size={batch_size} must be >= 1")
        self.block_length, _ = check_schedule(gen_length, steps, block_length)
        self.cfg = float(cfg or 0.0)
        if self.cfg < 0:
            raise ValueError(f"cfg={cfg} must be >= 0")
        self.likelihood = resolve_likelihood(likelihood, adapter)
        if self.likelihood == "dream" and tokenizer.eos_token_id is None:
            raise ValueError("likelihood=dream appends EOS to every answer, but the tokenizer has no EOS token")
        self.remasking = resolve_remasking(remasking, adapter)
        check_sampling(alg, alg_temp, top_p, top_k, float(cfg), temperature)
        self.schedule = resolve_schedule(schedule, adapter)
        self.gen_options = {"schedule": self.schedule, "alg": alg, "alg_temp": alg_temp, "top_p": top_p,
                            "top_k": top_k, "cfg": float(cfg)}
        self.temperature = temperature
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.mc_num, self.batch_size_per_step = int(mc_num), int(batch_size)
        self.gen_length, self.steps = int(gen_length), int(steps)
        self.seed, self.add_bos_token, self.check_greedy = int(seed), add_bos_token, check_greedy
        self.progress = progress
        self._device = torch.device(device) if device else next(model.parameters()).device
        self._max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences with")
        self.prefix_token_id = int(prefix)

    # -- lm-eval properties -----------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return int(self._max_length)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_step

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "freeact").replace("/", "__")

    # -- tokenisation -----------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self) -> list[int]:
        return [self.prefix_token_id] if self.add_bos_token else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids incl. the prefix token, continuation ids), as lm-eval's HFLM splits them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self.tok_encode(continuation)
        ctx = self._prefix() + ctx
        if not ctx:  # the first token needs a left neighbour (and Dream cannot score position 0)
            ctx = [self.prefix_token_id]
        return ctx, cont

    def _fit(self, ctx: list[int], cont: list[int], room: int | None = None) -> tuple[list[int], list[int]]:
        """Left-truncate to ``room`` tokens (default the model's context length; the continuation
        is kept whole if it fits)."""
        room = room or self.max_length
        if not cont:
            raise ValueError("loglikelihood: the continuation encodes to no tokens")
        if len(cont) >= room:
            cont = cont[-(room - 1):]
        keep = room - len(cont)
        return ctx[-keep:], cont

    # -- scoring ----------------------------------------------------------------------------
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], check_greedy: bool,
                    append_eos: bool = True) -> list[tuple[float, bool]]:
        """Log-likelihood bound (minus the MC ELBO) and greedy flag for (context ids, target ids).
        Requests are scored in chunks of about ``64 * batch_size`` rows (bounded memory), sorted by
        length so that rows sharing a forward need little padding.

        With Dream's estimator (``likelihood="dream"``) and ``append_eos``, EOS follows the target
        as Dream's own evaluation does: visible, never masked, never scored."""
        eos = [self.tokenizer.eos_token_id] if self.likelihood == "dream" and append_eos else []
        fitted = [self._fit(ctx, cont, self.max_length - len(eos)) for ctx, cont in pairs]
        order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
        per_chunk = max(1, 64 * self.batch_size_per_step // (self.mc_num + int(check_greedy)))
        out: list = [None] * len(fitted)
        chunks = [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
        for idx in tqdm(chunks, desc="mc-likelihood", disable=not self.progress or len(chunks) < 2, leave=False):
            seqs, targets, prompts, gens = [], [], [], []
            for i in idx:
                ctx, cont = fitted[i]
                seqs.append(torch.tensor(ctx + cont + eos, dtype=torch.long))
                pos = torch.arange(len(ctx) + len(cont) + len(eos))
                targets.append((pos >= len(ctx)) & (pos < len(ctx) + len(cont)))
                prompts.append(pos < len(ctx))
                gens.append(torch.Generator().manual_seed(request_seed(self.seed, ctx, cont)))
            nll, greedy = sequences_nll(self.model, self.adapter, seqs, targets, self.mc_num, gens,
                                        batch_size=self.batch_size_per_step, device=str(self._device),
                                        check_greedy=check_greedy, progress=self.progress and len(chunks) < 2,
                                        estimator=self.likelihood, cfg=self.cfg, prompts=prompts)
            for j, i in enumerate(idx):
                out[i] = (-nll[j], bool(greedy[j]) if greedy else False)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        out = self.score_pairs(pairs, self.check_greedy)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1)):
                windows.append((ctx, pred))
                owner.append(i)
        scores = self.score_pairs(windows, check_greedy=False, append_eos=False) if windows else []
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            out[i] += ll
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    # -- generation -------------------------------------------------------------------------
    def _decode(self, ids: torch.Tensor, until: list[str]) -> str:
        ids = ids.tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        room = self.max_length - self.gen_length
        if room < 1:
            raise ValueError(f"gen_length={self.gen_length} leaves no room for a prompt "
                             f"in max_length={self.max_length}")
        prompts, settings = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if self.temperature is not None:
                temperature = float(self.temperature)
            else:
                temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample") else 0.0
            prompts.append((self._prefix() + self.tok_encode(context))[-room:] or [self.prefix_token_id])
            settings.append((until, temperature))
        # batch requests of equal temperature, longest prompts first (less padding)
        order = sorted(range(len(requests)), key=lambda i: (settings[i][1], -len(prompts[i])))
        out: list = [None] * len(requests)
        g = torch.Generator().manual_seed(self.seed)
        bs = self.batch_size_per_step
        batches = []
        for i in order:
            if batches and len(batches[-1]) < bs and settings[batches[-1][0]][1] == settings[i][1]:
                batches[-1].append(i)
            else:
                batches.append([i])
        for idx in tqdm(batches, desc="diffusion-generate", disable=not self.progress or disable_tqdm, leave=False):
            gen = diffusion_generate(self.model, self.adapter, [prompts[i] for i in idx], self.gen_length,
                                     self.steps, self.block_length, self.remasking, settings[idx[0]][1], g,
                                     device=str(self._device), **self.gen_options)
            for row, i in enumerate(idx):
                out[i] = self._decode(gen[row], settings[i][0])
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def _as_bool(v) -> bool:
    """``trust_remote_code=True`` from lm-eval's ``--model_args`` arrives as a string."""
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")
