"""Measure the real testbeds on CPU and write results/testbeds.md (+ the raw numbers as JSON).

For each testbed (``model=testbed_dllm``, ``testbed_dream``, ``testbed_ar``, ``testbed_vlm``):

1. held-out likelihood on ``wiki.test`` at full precision: the Monte-Carlo ELBO (dLLM) or
   perplexity (AR), in nats/token and nats/byte; for the dLLM also the unigram baseline (the
   cross-entropy of the same tokens under the add-one-smoothed token frequencies of the training
   text, and the test tokens' own unigram entropy, which no unigram model beats);
2. input-channel outlier ratios of every block linear's input (max over channels of the
   per-channel max |x|, over the median channel) on ``wiki.valid`` windows; for the dLLM split
   by token type (masked / unmasked, the windows masked with t ~ U(0, 1) as in calibration);
3. the method table: FP16 vs W4A4 RTN vs W4A4 QuaRot, each a full freeact run
   (:func:`freeact.experiment.run_experiment` on the composed configs).

For ``testbed_vlm`` the held-out measure is the greedy-answer accuracy on easy-VQA test
questions (``eval=mm_easyvqa``) next to two baselines that ignore the image, and the outlier
statistics run on easy-VQA train questions with their images, split into vision / text tokens.

    /work/venv/bin/python experiments/testbeds/measure.py                       # both testbeds
    /work/venv/bin/python experiments/testbeds/measure.py --testbeds dllm --chunks 4 --mc 4 --no_write
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

from freeact import config as _config  # noqa: E402,F401  (registers the config schemas)
from freeact.config import config_hash  # noqa: E402
from freeact.validate import validate  # noqa: E402
from freeact.data.text import chunks, mask_tokens, random_windows, read_text, token_stream  # noqa: E402
from freeact.experiment import git_commit, load_model, run_experiment  # noqa: E402
from freeact.analysis import activation_stats  # noqa: E402
from freeact.models import get_adapter  # noqa: E402
from freeact.models.token_types import TokenTypes  # noqa: E402

TESTBEDS = {"dllm": "testbed_dllm", "dream": "testbed_dream", "ar": "testbed_ar", "vlm": "testbed_vlm"}
MDM = ("dllm", "dream")  # masked-diffusion testbeds: ELBO, masked / unmasked token types
# row name -> (method config, quant config, extra overrides)
METHODS = {
    "fp16": ("fp16", "w16a16", []),
    "rtn": ("rtn", "w4a4", []),
    "quarot_rtn": ("quarot", "w4a4", ["method.weight_algo=rtn"]),
    "quarot": ("quarot", "w4a4", []),
}
METHOD_LABELS = {"fp16": "FP16 (no quantization)", "rtn": "W4A4 RTN",
                 "quarot_rtn": "W4A4 QuaRot, RTN weights", "quarot": "W4A4 QuaRot, GPTQ weights (paper setting)"}
GROUPS = ("qkv", "o", "gate_up", "down")
GROUP_OF = {"q": "qkv", "o": "o", "up": "gate_up", "down": "down"}  # linears that share an input: once


def input_channel_stats(model, adapter, batches, token_types=None) -> dict:
    """``{(layer, group, type): {ratio, max, median, top_channel, mean_abs}}`` (type "all": every token)."""
    df = activation_stats(model, adapter, batches, token_types, include_all=True)
    df = df[df.linear.isin(list(GROUP_OF))]
    return {(r.layer, GROUP_OF[r.linear], r.type): {"ratio": r.max_over_median, "max": r.max, "median": r.median,
                                                    "top_channel": r.top_channel, "mean_abs": r.mean_abs}
            for r in df.itertuples()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbeds", nargs="+", default=["dllm", "ar"], choices=list(TESTBEDS))
    p.add_argument("--methods", nargs="*", default=["fp16", "rtn", "quarot_rtn"], choices=list(METHODS),
                   help="rows of the method table (quarot = QuaRot with GPTQ weights, slow on CPU for testbed_ar)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16, help="wiki.test chunks of --seqlen tokens per evaluation")
    p.add_argument("--ar_fp_chunks", type=int, default=-1,
                   help="also the AR FP perplexity on this many chunks (0: all; -1: skip)")
    p.add_argument("--mc", type=int, default=16, help="Monte-Carlo draws per chunk (dLLM ELBO)")
    p.add_argument("--stat_windows", type=int, default=8, help="wiki.valid windows for the outlier statistics")
    p.add_argument("--vqa_questions", type=int, default=500, help="easy-VQA test questions (testbed_vlm)")
    p.add_argument("--vqa_stat_questions", type=int, default=64, help="easy-VQA train questions for the VLM statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_md", default=str(ROOT / "results" / "testbeds.md"))
    p.add_argument("--out_json", default=str(HERE / "measure_log.json"))
    p.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("--render_only", action="store_true", help="rewrite the markdown from --out_json, measure nothing")
    return p.parse_args(argv)


def compose_cfg(model: str, method: str, quant: str, extra: list[str], a) -> object:
    overrides = [f"model={model}", f"method={method}", f"quant={quant}", f"seed={a.seed}", "progress=false"]
    if model == TESTBEDS["vlm"]:
        overrides += ["eval=mm_easyvqa", "calib=mm_easyvqa", f"eval.nsamples={a.vqa_questions}", *extra]
    else:
        overrides += [f"eval.seqlen={a.seqlen}", f"eval.max_chunks={a.chunks}", f"eval.mc_num={a.mc}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def text_bytes(tok, ids: torch.Tensor) -> int:
    return len(tok.decode(ids.flatten().tolist()).encode("utf-8"))


def unigram_baselines(tok, test: torch.Tensor) -> dict:
    train = torch.cat([token_stream(tok, read_text(s)) for s in ("english.train", "wiki.train")])
    p = (torch.bincount(train, minlength=len(tok)).double() + 1) / (train.numel() + len(tok))
    q = torch.bincount(test.flatten(), minlength=len(tok)).double() / test.numel()
    own = -(q[q > 0] * q[q > 0].log()).sum().item()
    return {"train_unigram_ce": -p.log()[test.flatten()].mean().item(), "test_unigram_entropy": own}


def likelihood_section(name: str, model, tok, a) -> dict:
    """Evaluated token count, bytes, and (dLLM) the unigram baselines of the evaluated text;
    for the VLM the easy-VQA accuracy at full precision and the baselines without the image."""
    if name == "vlm":
        from freeact.data.easy_vqa import chance_accuracy
        from freeact.eval.multimodal import evaluate_multimodal
        from freeact.experiment import load_model_processor

        cfg = compose_cfg(TESTBEDS["vlm"], "fp16", "w16a16", [], a)
        m = evaluate_multimodal(model, load_model_processor(cfg.model), cfg.eval, progress=False)
        return {"eval": cfg.eval.name, "questions": m[f"{cfg.eval.name}.n"], "vqa_acc": m[f"{cfg.eval.name}.vqa_acc"],
                "answer_nll": m[f"{cfg.eval.name}.answer_nll"], **chance_accuracy("test")}
    ids = token_stream(tok, read_text("wiki.test"))
    ev = chunks(ids, a.seqlen, a.chunks)
    out = {"test_tokens_total": ids.numel(), "eval_tokens": ev.numel(), "eval_bytes": text_bytes(tok, ev)}
    if name in MDM:
        out.update(unigram_baselines(tok, ev))
    return out


def vlm_stats_section(model, a) -> dict:
    """Outlier statistics of the VLM's language model on easy-VQA train questions (image + question +
    answer), split into vision (image placeholder) and text tokens; padding left out."""
    from freeact.data.multimodal import build_mm_calib_set
    from freeact.experiment import load_model_processor
    from freeact.models.token_types import rules_from_names

    cfg = compose_cfg(TESTBEDS["vlm"], "fp16", "w16a16", [], a)
    adapter = get_adapter(model)
    calib = build_mm_calib_set(load_model_processor(cfg.model), "easy_vqa/train", a.vqa_stat_questions, a.seed)
    tt = TokenTypes(rules_from_names(adapter, ["vision", "text"]))
    batches = list(calib.batches(8))
    s = input_channel_stats(model, adapter, batches, tt)
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    frac = torch.isin(ids, torch.tensor(adapter.vision_placeholder_ids())).float().mean().item()
    return {"questions": a.vqa_stat_questions, "source": "easy_vqa/train", "tokens": ids.numel(),
            "vision_fraction": frac, "types": ["vision", "text"],
            "stats": [{"layer": k[0], "input": k[1], "tokens": k[2], **v} for k, v in sorted(s.items())]}


def stats_section(name: str, model, tok, a) -> dict:
    if name == "vlm":
        return vlm_stats_section(model, a)
    ids = token_stream(tok, read_text("wiki.valid"))
    x = random_windows(ids, a.stat_windows, a.seqlen, a.seed)
    adapter = get_adapter(model)
    if name in MDM:
        xin, _ = mask_tokens(x, adapter.mask_token_id, torch.Generator().manual_seed(a.seed + 1))
        tt = TokenTypes([("mask", [adapter.mask_token_id]), ("unmasked", None)])
        s = input_channel_stats(model, adapter, list(xin.split(2)), tt)
        frac = (xin == adapter.mask_token_id).float().mean().item()
    else:
        s = input_channel_stats(model, adapter, list(x.split(2)))
        frac = None
    return {"windows": a.stat_windows, "seqlen": a.seqlen, "mask_fraction": frac,
            "types": ["mask", "unmasked"] if name in MDM else [],
            "stats": [{"layer": k[0], "input": k[1], "tokens": k[2], **v} for k, v in sorted(s.items())]}


def method_rows(name: str, a) -> list[dict]:
    rows = []
    for key in a.methods:
        method, quant, extra = METHODS[key]
        cfg = compose_cfg(TESTBEDS[name], method, quant, extra, a)
        specs = validate(cfg)
        t0 = time.time()
        row, model = run_experiment(cfg, specs, config_hash(cfg))
        del model
        e = cfg.eval.name
        r = {"row": key, "label": METHOD_LABELS[key], "method": method, "quant": quant,
             "weight_algo": cfg.method.get("weight_algo"), "quant_seconds": row["quant_seconds"],
             "seconds": round(time.time() - t0, 1)}
        if name == "vlm":
            r.update(vqa_acc=row[f"{e}.vqa_acc"], answer_nll=row[f"{e}.answer_nll"], questions=row[f"{e}.n"])
            print(f"[{name}] {key}: accuracy {r['vqa_acc']:.4f} ({r['seconds']}s)", flush=True)
        else:
            r.update(nll=row[f"{e}.nll"], ppl=row[f"{e}.ppl"], eval_tokens=row[f"{e}.eval_tokens"])
            print(f"[{name}] {key}: nll {r['nll']:.4f} ppl {r['ppl']:.2f} ({r['seconds']}s)", flush=True)
        rows.append(r)
    return rows


def ar_full_fp(a) -> dict | None:
    cfg = compose_cfg(TESTBEDS["ar"], "fp16", "w16a16", [f"eval.max_chunks={a.ar_fp_chunks or 'null'}"], a)
    row, _ = run_experiment(cfg, validate(cfg), config_hash(cfg))
    n = cfg.eval.name
    return {"nll": row[f"{n}.nll"], "ppl": row[f"{n}.ppl"], "eval_tokens": row[f"{n}.eval_tokens"],
            "chunks": a.ar_fp_chunks or "all"}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_info(a) -> dict:
    """Where and how a testbed was measured (stored with each testbed's numbers)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.machine()} CPU, "
            f"{os.cpu_count()} cores ({cpu_name()})", "torch": torch.__version__,
            "transformers": transformers.__version__, "git_commit": git_commit(),
            "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]),
            "settings": {k: v for k, v in vars(a).items() if not k.startswith("out")}}


def measure(a, res: dict) -> dict:
    """Measure ``a.testbeds`` into ``res["testbeds"]`` (entries of other testbeds are kept)."""
    res.setdefault("testbeds", {})
    for name in a.testbeds:
        t0 = time.time()
        cfg = compose_cfg(TESTBEDS[name], "fp16", "w16a16", [], a)
        validate(cfg)
        model, tok = load_model(cfg.model, "cpu", seed=a.seed)
        c = model.config
        c = getattr(c, "text_config", c)  # a VLM: its language model
        tb = {"model": TESTBEDS[name], "run": run_info(a), "params": sum(p.numel() for p in model.parameters()),
              "arch": {k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size")}}
        tb["text"] = likelihood_section(name, model, tok, a)
        tb["outliers"] = stats_section(name, model, tok, a)
        print(f"[{name}] loaded, text and outlier statistics in {time.time() - t0:.0f}s", flush=True)
        del model
        tb["methods"] = method_rows(name, a)
        if name == "ar" and a.ar_fp_chunks >= 0:
            tb["fp_full"] = ar_full_fp(a)
            print(f"[ar] FP on {tb['fp_full']['chunks']} chunks: ppl {tb['fp_full']['ppl']:.2f}", flush=True)
        res["testbeds"][name] = tb
    return res


# ---------------------------------------------------------------------------------------- report
def _f(x, nd=3):
    return "" if x is None else f"{x:.{nd}f}"


def render(res: dict) -> str:
    L = ["# Real testbeds: measured", "",
         "Generated by `experiments/testbeds/measure.py` (CPU). Held-out text: `wiki.test`, tokenized by "
         "each model's tokenizer and cut into consecutive chunks of `seqlen` tokens; every row uses the first "
         "`chunks` chunks. The dLLM ELBO uses `mc` stratified Monte-Carlo draws per chunk (seed 1234, "
         "`conf/eval/text.yaml`), the same masks for every row. Calibration: `conf/calib/wiki.yaml` (32 windows "
         "of 128 tokens from `wiki.train`). How the testbeds were made: `experiments/testbeds/README.md`.", "",
         "| testbed | measured | machine | commit | command | seqlen | chunks | mc |",
         "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for name, tb in res["testbeds"].items():
        r, s = tb["run"], tb["run"]["settings"]
        L.append(f"| {tb['model']} | {r['date']} | {r['machine']}; torch {r['torch']}, transformers "
                 f"{r['transformers']} | {r['git_commit']} | `{r['command']}` | {s['seqlen'] if name != 'vlm' else ''} | "
                 f"{s['chunks'] if name != 'vlm' else ''} | "
                 f"{s['mc'] if name in MDM else ''} |")
    L.append("")
    L += ["## Held-out likelihood at full precision", "",
          "| testbed | params | evaluated tokens (bytes) | nats/token | nats/byte | perplexity (bound) | "
          "unigram baseline nats/token (train freq.) | unigram entropy of the text |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, tb in res["testbeds"].items():
        fp = next((r for r in tb["methods"] if r["row"] == "fp16"), None)
        t = tb["text"]
        if name == "vlm":
            continue
        if fp:
            L.append(f"| {tb['model']} | {tb['params'] / 1e6:.1f}M | {fp['eval_tokens']:,} ({t['eval_bytes']:,}) | "
                     f"{_f(fp['nll'])} | {_f(fp['nll'] * fp['eval_tokens'] / t['eval_bytes'])} | {fp['ppl']:.2f} | "
                     f"{_f(t.get('train_unigram_ce'))} | {_f(t.get('test_unigram_entropy'))} |")
        log = HERE / {"dllm": "train_log.json", "dream": "train_dream_log.json"}.get(name, "-")
        if name in MDM and log.exists():
            t = json.loads(log.read_text())["test_elbo"]
            t = t.get("seqlen512") if name == "dllm" else t
            if t:
                L.append(f"| {tb['model']} (all chunks, {t['mc_num']} draws, H200 after training) | | "
                         f"{t['eval_tokens']:,} | {_f(t['nll'])} | | {t['ppl']:.2f} | | |")
        if tb.get("fp_full"):
            f = tb["fp_full"]
            L.append(f"| {tb['model']} ({f['chunks']} chunks) | | {f['eval_tokens']:,} | {_f(f['nll'])} | | "
                     f"{f['ppl']:.2f} | | |")
    L += ["", "For the dLLM the nats/token are the Monte-Carlo ELBO bound (LLaDA's estimator). For the AR model "
          "nats/byte divides by the bytes of the whole chunks, including each chunk's first token, which is "
          "not predicted.", ""]
    vlm = res["testbeds"].get("vlm")
    if vlm:
        t = vlm["text"]
        L += ["## Held-out accuracy at full precision: testbed_vlm", "",
              f"easy-VQA test split, a seeded sample of {t['questions']} questions (`conf/eval/mm_easyvqa.yaml`), "
              "greedy answer scored by VQA accuracy. The baselines ignore the image: a uniform guess among the "
              "answers of the question's kind (yes/no, shape, colour), and the train split's most frequent answer "
              "for the same question text (over the whole test split).", "",
              "| testbed | params | questions | accuracy | answer NLL (nats/token) | uniform guess within kind | "
              "question prior |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| {vlm['model']} | {vlm['params'] / 1e6:.1f}M | {t['questions']} | {_f(t['vqa_acc'])} | "
              f"{_f(t['answer_nll'])} | {_f(t['uniform_within_kind'])} | {_f(t['question_prior'])} |"]
        log = HERE / "train_vlm_log.json"
        if log.exists():
            g = json.loads(log.read_text())
            L.append(f"| {vlm['model']} (all {g['test_questions']:,} test questions, H200 after training, "
                     f"teacher-forced exact match) | | {g['test_questions']:,} | {_f(g['test_acc'])} | | | |")
        L.append("")
    L += ["## Methods (W4A4: per-channel symmetric 4-bit weights, per-token symmetric 4-bit activations)", "",
          "| testbed | row | weights | nats/token | perplexity | increase over FP16 (nats/token) | quantization s |",
          "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, tb in res["testbeds"].items():
        fp = next((r.get("nll") for r in tb["methods"] if r["row"] == "fp16"), None)
        if name == "vlm":
            for r in tb["methods"]:
                L.append(f"| {tb['model']} | {r['label']} | {'' if r['row'] == 'fp16' else r['weight_algo']} | "
                         f"accuracy {_f(r['vqa_acc'])} | | | {r['quant_seconds']:.0f} |")
            continue
        for r in tb["methods"]:
            d = "" if fp is None or r["row"] == "fp16" else f"{r['nll'] - fp:+.3f}"
            w = "" if r["row"] == "fp16" else r["weight_algo"]
            L.append(f"| {tb['model']} | {r['label']} | {w} | {_f(r['nll'])} | {r['ppl']:.2f} | {d} | "
                     f"{r['quant_seconds']:.0f} |")
    L += ["", "RTN rows use `conf/method/rtn.yaml` (no clipping). QuaRot rows use `conf/method/quarot.yaml`, QuaRot's "
          "published settings: fused norms, a random Hadamard on the residual stream, online Hadamards on the "
          "o_proj and down_proj inputs, activation clip 0.9, and an MSE weight-clip search. The RTN-weight row "
          "separates the rotation (with its clipping) from GPTQ. testbed_ar's linear weights already sit on a "
          "Q4_1 grid (asymmetric, blocks of 32 inputs), but the per-channel symmetric W4 used here does not align "
          "with it and is lossy.", "",
          "Every method at W4A4 (full freeact runs, one CSV row each): `results/tables/testbed_dllm_w4a4.md`, "
          "`testbed_ar_w4a4.md`, `testbed_dream_w4a4.md` and `testbed_vlm_w4a4.md` (commands in the README).", ""]
    for name, tb in res["testbeds"].items():
        o = tb["outliers"]
        st = o["stats"]
        where = (f"{o['questions']} easy-VQA train questions with their images ({o['tokens']:,} tokens, "
                 f"{o['vision_fraction']:.0%} of them image tokens)" if name == "vlm" else
                 f"{o['windows']} windows of {o['seqlen']} tokens from `wiki.valid`"
                 + (f", masked with t ~ U(0,1) per window ({o['mask_fraction']:.0%} of the tokens masked)" if
                    o["mask_fraction"] is not None else ""))
        L += [f"## Input-channel outliers: {tb['model']}", "",
              where + ". Ratio = max over input channels of (max over tokens |x|) / its median over channels. "
                      "`qkv` is the input of q/k/v_proj, `gate_up` of gate/up_proj.", ""]
        types = o.get("types") or (["mask", "unmasked"] if name in MDM else [])
        if types:
            t1, t2 = types
            L += [f"| layer | input | ratio, all tokens | ratio, {t1} | ratio, {t2} | mean abs x, {t1} | "
                  f"mean abs x, {t2} | top channel |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            idx = {(e["layer"], e["input"], e["tokens"]): e for e in st}
            for layer in sorted({e["layer"] for e in st}):
                for g in GROUPS:
                    a_, m_, u_ = (idx.get((layer, g, k)) for k in ("all", t1, t2))
                    L.append(f"| {layer} | {g} | {a_['ratio']:.1f} | {m_['ratio']:.1f} | {u_['ratio']:.1f} | "
                             f"{m_['mean_abs']:.3f} | {u_['mean_abs']:.3f} | {a_['top_channel']} |")
        else:
            L += ["| layer | " + " | ".join(GROUPS) + " | largest input value |",
                  "| ---: | " + " | ".join("---:" for _ in GROUPS) + " | ---: |"]
            idx = {(e["layer"], e["input"]): e for e in st if e["tokens"] == "all"}
            for layer in sorted({e["layer"] for e in st}):
                es = [idx[(layer, g)] for g in GROUPS]
                L.append(f"| {layer} | " + " | ".join(f"{e['ratio']:.1f}" for e in es)
                         + f" | {max(e['max'] for e in es):.1f} |")
        big = sorted((e for e in st if e["tokens"] == "all" and e["ratio"] >= 20), key=lambda e: -e["ratio"])
        L += ["", "Inputs at or above 20x (all tokens): " + (", ".join(
            f"layer {e['layer']} {e['input']} {e['ratio']:.0f}x" for e in big) or "none") + ".", ""]
    return "\n".join(L) + "\n"


def main(argv=None):
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    prev = Path(a.out_json)
    res = json.loads(prev.read_text()) if prev.exists() and (a.render_only or not a.no_write) else {}
    if not a.render_only:
        res = measure(a, res)
    md = render(res)
    print(md)
    if not a.no_write:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
        Path(a.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_md).write_text(md)


if __name__ == "__main__":
    main()
