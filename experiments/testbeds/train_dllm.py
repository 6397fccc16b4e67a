"""Train ``testbed_dllm``: a small LLaDA-architecture masked-diffusion LM, from scratch, on the
shipped English corpora, and export it as a LLaDA checkpoint (bf16, sharded) plus a JSON log.

Objective (LLaDA's): per sequence ``t ~ U(eps, 1)``, every token masked with probability ``t``
(mask id 1 of the shipped tokenizer), cross-entropy on the masked tokens divided by ``t``,
summed and divided by the number of tokens. Attention is bidirectional
(:class:`freeact.models.dllm.LLaDAModelLM`). Training text: ``english.train`` + ``wiki.train``
(wiki sampled ``--wiki_repeat`` times as often per token); ``wiki.valid`` picks the best
checkpoint; ``wiki.test`` is only scored at the end.

Imports only torch, transformers, tokenizers, safetensors and hydra-free freeact modules, so it
runs on a bare GPU image with ``PYTHONPATH=.``. One command (see README.md):

    PYTHONPATH=. python3 experiments/testbeds/train_dllm.py --out OUT_DIR
    PYTHONPATH=. python experiments/testbeds/train_dllm.py --out /tmp/tb --tiny   # CPU smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from freeact.data.text import read_text, token_stream
from freeact.eval.elbo import elbo
from freeact.models import get_adapter
from freeact.models.checkpoint_formats import save_llada_checkpoint
from freeact.models.loading import load_tokenizer
from freeact.models.tiny import build_tiny

ARCH = dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=6, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
TINY_ARCH = dict(ARCH, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
EPS = 1e-3  # LLaDA's floor on the masking ratio


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="writes OUT/testbed_dllm/ (checkpoint) and OUT/train_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--short_seqlen", type=int, default=128, help="every --short_every-th step uses this length")
    p.add_argument("--short_every", type=int, default=4)
    p.add_argument("--batch_tokens", type=int, default=131072, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --time_budget)")
    p.add_argument("--time_budget", type=float, default=330.0, help="seconds of training loop, compile included")
    p.add_argument("--probe", type=int, nargs=2, default=(12, 40), help="steps timed to size the schedule")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--val_chunks", type=int, default=176)
    p.add_argument("--wiki_repeat", type=int, default=2)
    p.add_argument("--test_mc", type=int, default=32, help="Monte-Carlo draws per chunk for the final test ELBO")
    p.add_argument("--test_max_chunks", type=int, default=None)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--shard_mb", type=float, default=15.0)
    p.add_argument("--tiny", action="store_true", help="tiny model and a few steps: a CPU smoke test")
    p.add_argument("--max_chars", type=int, default=None, help="read at most this many chars per corpus")
    p.add_argument("--bos", action="store_true",
                   help="every window starts with the BOS token (never masked, never scored), as LLaDA's "
                        "training data does; the model's config then says bos_prefix and evaluations add it")
    return p.parse_args(argv)


def training_stream(tok, wiki_repeat: int, max_chars: int | None) -> torch.Tensor:
    """english.train, EOS, then wiki.train ``wiki_repeat`` times, EOS-separated: one token stream."""
    eos = torch.tensor([tok.eos_token_id])
    eng = token_stream(tok, read_text("english.train", max_chars))
    wiki = token_stream(tok, read_text("wiki.train", max_chars))
    return torch.cat([eng, eos] + [wiki, eos] * wiki_repeat)


def lr_at(step: int, total: int | None, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    if total is None:
        return a.lr
    frac = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def mask_batch(x: torch.Tensor, mask_id: int, gen: torch.Generator, t: torch.Tensor | None = None,
               bos: bool = False):
    b, l = x.shape
    if t is None:
        t = torch.rand(b, device=x.device, generator=gen)
    t = (1 - EPS) * t + EPS
    m = torch.rand(b, l, device=x.device, generator=gen) < t[:, None]
    if bos:
        m[:, 0] = False  # the start token is context, never a target
    return torch.where(m, torch.full_like(x, mask_id), x), m, t


def mdm_loss(model, x: torch.Tensor, x_in: torch.Tensor, m: torch.Tensor, t: torch.Tensor,
             n_target: int, shift: bool = False) -> torch.Tensor:
    """Per-sequence LLaDA loss: sum over masked tokens of CE / t, divided by the number of
    scorable tokens ``n_target``. (b,) ``shift``: Dream's alignment, the output at position
    i - 1 scores token i (position 0 scores itself), as :meth:`ModelAdapter.logits` does."""
    logits = model(input_ids=x_in, use_cache=False).logits
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none").view_as(x)
    return (ce * m / t[:, None]).sum(1) / n_target


def check_bidirectional(model, vocab: int, device: str) -> None:
    """Changing the last token must change the logits at the first position."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, vocab, (1, 16), generator=g).to(device)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % vocab
    with torch.no_grad():
        d = (model(input_ids=x).logits[0, 0] - model(input_ids=y).logits[0, 0]).abs().max().item()
    if not d > 0:
        raise RuntimeError("the model is not bidirectional: position 0 ignores the last token")


@torch.no_grad()
def validation_loss(model, val_x, val_in, val_m, val_t, batch: int, amp, n_target: int, shift: bool = False) -> float:
    """Mean per-token ELBO (nats/token) over fixed masked copies of the validation chunks."""
    model.eval()
    tot = 0.0
    for i in range(0, len(val_x), batch):
        with amp():
            tot += mdm_loss(model, val_x[i:i + batch], val_in[i:i + batch], val_m[i:i + batch],
                            val_t[i:i + batch], n_target, shift).sum().item()
    model.train()
    return tot / len(val_x)


def write_train_log(log: dict, path: Path, device: str, t_start: float) -> dict:
    """Add where and when it ran (device, torch and transformers versions, date, wall seconds since
    ``t_start``) to a training log and write it to ``path`` as JSON; returns the completed log."""
    log = {**log, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_seconds": time.time() - t_start}
    path.write_text(json.dumps(log, indent=1))
    return log


class StepBudget:
    """Fits a schedule to a time budget: times the steps ``probe[0]..probe[1]`` and then fixes the
    step count (unless one was given), so the loop plus compilation take about ``budget`` s."""

    def __init__(self, total: int | None, probe, budget: float, sync):
        self.total, self.probe, self.budget, self.sync = total, tuple(probe), budget, sync
        self.step_time = self._probe_t0 = None
        self.t0 = time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def before_step(self, step: int) -> int | None:
        """Call before each step; returns the total step count (None until it is known)."""
        if step == self.probe[0]:
            self.sync()
            self._probe_t0 = time.time()
        if step == self.probe[1] and self._probe_t0 is not None:
            self.sync()
            self.step_time = (time.time() - self._probe_t0) / (self.probe[1] - self.probe[0])
            if self.total is None:
                self.total = step + int((self.budget - self.elapsed()) / self.step_time)
                print(f"step time {self.step_time * 1e3:.1f} ms -> {self.total} steps in the {self.budget:.0f}s "
                      "budget", flush=True)
        return self.total

    def overrun(self) -> bool:
        """Well past the budget (a machine slower than the probe said): stop early."""
        return self.total is not None and self.elapsed() > 1.15 * self.budget + 30


@torch.no_grad()
def outlier_summary(model, batches: torch.Tensor, device: str) -> list[dict]:
    """Per block linear: max over input channels of max|x| / median channel (all tokens of the
    masked validation windows ``batches``), largest first."""
    from freeact.analysis import activation_stats

    df = activation_stats(model, get_adapter(model), [b[None].to(device) for b in batches])
    df = df.sort_values("max_over_median", ascending=False)
    return [{"layer": int(r.layer), "linear": r.linear, "ratio": float(r.max_over_median), "max": float(r.max)}
            for r in df.itertuples()]


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    if a.tiny:
        a.seqlen, a.short_seqlen, a.batch_tokens, a.warmup = 64, 32, 512, 2
        a.steps = a.steps or 8
        a.eval_every, a.log_every, a.val_chunks, a.test_mc, a.test_max_chunks = 4, 2, 4, 2, 2
        a.probe = (2, 4)
        a.no_compile = True
        a.max_chars = a.max_chars or 200_000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tok = load_tokenizer(None)
    mask_id = tok.mask_token_id
    stream = training_stream(tok, a.wiki_repeat, a.max_chars).to(device)
    val_ids = token_stream(tok, read_text("wiki.valid", a.max_chars))
    test_ids = token_stream(tok, read_text("wiki.test", a.max_chars))
    print(f"tokens: train stream {stream.numel():,} | valid {val_ids.numel():,} | test {test_ids.numel():,} "
          f"({time.time() - t_start:.1f}s)", flush=True)

    arch = TINY_ARCH if a.tiny else ARCH
    model = build_tiny("llada", arch, tok, seed=a.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    check_bidirectional(model, len(tok), device)
    print(f"model: {n_params / 1e6:.2f}M params, arch {arch}", flush=True)

    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")

    gen = torch.Generator(device=device).manual_seed(a.seed)
    vgen = torch.Generator(device=device).manual_seed(a.seed + 1)
    bos = int(a.bos)
    text_len = a.seqlen - bos
    n_val = min(a.val_chunks, val_ids.numel() // text_len)
    val_x = val_ids[: n_val * text_len].view(n_val, text_len).to(device).repeat(2, 1)
    if bos:
        val_x = torch.cat([torch.full_like(val_x[:, :1], tok.bos_token_id), val_x], 1)
    val_t = ((torch.arange(2 * n_val, device=device) + torch.rand(2 * n_val, device=device, generator=vgen))
             / (2 * n_val))[torch.randperm(2 * n_val, device=device, generator=vgen)]
    val_in, val_m, val_t = mask_batch(val_x, mask_id, vgen, val_t, bos=a.bos)
    vloss = lambda: validation_loss(model, val_x, val_in, val_m, val_t, 64, amp, text_len)  # noqa: E731

    loss_fn = mdm_loss
    compiled = None
    if not a.no_compile:
        compiled = torch.compile(mdm_loss, dynamic=False)
    model.train()
    ar = torch.arange(a.seqlen, device=device)

    def train_step(step: int, lr: float) -> float:
        nonlocal compiled
        short = a.short_every and step % a.short_every == a.short_every - 1
        L = a.short_seqlen if short else a.seqlen
        B = max(1, a.batch_tokens // L)
        starts = torch.randint(0, stream.numel() - L, (B,), device=device, generator=gen)
        x = stream[starts[:, None] + ar[:L - bos]]
        if bos:
            x = torch.cat([torch.full_like(x[:, :1], tok.bos_token_id), x], 1)
        x_in, m, t = mask_batch(x, mask_id, gen, bos=a.bos)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp():
            if compiled is not None:
                try:
                    loss = compiled(model, x, x_in, m, t, L - bos).mean()
                except Exception as e:  # noqa: BLE001  (any compiler failure: train eagerly instead)
                    print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly", flush=True)
                    compiled = None
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model, x, x_in, m, t, L - bos).mean()
            else:
                loss = loss_fn(model, x, x_in, m, t, L - bos).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    total = a.steps
    curve, val_curve = [], []
    best = (float("inf"), -1, None)
    tokens_seen = 0
    budget = StepBudget(total, a.probe, a.time_budget, sync)
    running, running_n = torch.zeros((), device=device), 0
    step = 0
    while total is None or step < total:
        if step % a.eval_every == 0:
            v = vloss()
            val_curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(budget.elapsed(), 1),
                              "valid_nll": v})
            if v < best[0]:
                best = (v, step, copy.deepcopy(model.state_dict()))
            print(f"step {step:5d} | valid {v:.4f} nats/token", flush=True)
        total = budget.before_step(step)
        lr = lr_at(step, total, a)
        running += train_step(step, lr)
        running_n += 1
        L = a.short_seqlen if (a.short_every and step % a.short_every == a.short_every - 1) else a.seqlen
        tokens_seen += max(1, a.batch_tokens // L) * L
        step += 1
        if step % a.log_every == 0:
            loss = (running / running_n).item()
            running, running_n = torch.zeros((), device=device), 0
            el = budget.elapsed()
            curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(el, 1), "train_loss": loss,
                          "lr": lr})
            if step % (a.log_every * 10) == 0 or a.tiny:
                print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {tokens_seen / 1e6:.1f}M tok | {el:.0f}s",
                      flush=True)
        if budget.overrun() and not a.tiny:
            print("over the time budget: stopping early", flush=True)
            break
    sync()
    loop_seconds = budget.elapsed()
    v = vloss()
    val_curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(loop_seconds, 1), "valid_nll": v})
    print(f"step {step:5d} | valid {v:.4f} nats/token (final)", flush=True)
    if v <= best[0]:
        best = (v, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])

    # ship bf16; score the shipped (bf16-rounded) weights in float32
    model = model.to(torch.bfloat16).to(torch.float32).eval()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(a.out)
    ckpt = out / "testbed_dllm"
    save_llada_checkpoint(model.to(torch.bfloat16), ckpt, max_shard_mb=a.shard_mb)
    model.to(torch.float32)
    files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())}
    test = {}
    try:
        adapter = get_adapter(model)
        for sl in sorted({a.seqlen, a.short_seqlen}):
            r = elbo(model, adapter, test_ids, sl, mc_num=a.test_mc, seed=1234, batch_size=64,
                     max_chunks=a.test_max_chunks, device=device, progress=False,
                     bos_id=tok.bos_token_id if a.bos else None)
            test[f"seqlen{sl}"] = {**r, "mc_num": a.test_mc}
            print(f"test ELBO seqlen {sl}: {r['nll']:.4f} nats/token over {r['eval_tokens']} tokens", flush=True)
    except Exception as e:  # noqa: BLE001  (the checkpoint is saved; measure.py scores it again)
        test["error"] = f"{type(e).__name__}: {e}"
        print(f"test ELBO failed: {test['error']}", flush=True)
    outliers = outlier_summary(model, val_in[:8], device)
    print("input-channel max/median >= 20x: " + (", ".join(f"L{r['layer']} {r['linear']} {r['ratio']:.0f}x"
                                                           for r in outliers if r["ratio"] >= 20) or "none"), flush=True)
    log = {
        "outliers": outliers,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
        "arch": arch, "params": n_params, "seed": a.seed, "steps": step, "planned_steps": total,
        "tokens_seen": tokens_seen, "train_stream_tokens": stream.numel(),
        "epochs_over_stream": tokens_seen / stream.numel(),
        "step_time_ms_probe": None if budget.step_time is None else budget.step_time * 1e3,
        "tokens_per_s_probe": None if budget.step_time is None else a.batch_tokens / budget.step_time,
        "tokens_per_s_loop": tokens_seen / loop_seconds,
        "loop_seconds": loop_seconds,
        "compiled": compiled is not None, "best_valid_nll": best[0], "best_step": best[1],
        "test_elbo": test, "loss_curve": curve, "valid_curve": val_curve, "checkpoint_files": files,
    }
    log = write_train_log(log, out / "train_log.json", device, t_start)
    print(f"saved {ckpt} {files}; wall {log['wall_seconds']:.0f}s; tokens/s {log['tokens_per_s_loop']:,.0f}", flush=True)


if __name__ == "__main__":
    main()
