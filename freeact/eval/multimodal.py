"""Offline multimodal benchmark on a local JSONL folder (see :mod:`freeact.data.vqa_records`).

Per record ``type``:

* ``open``: greedy answer, scored with VQA accuracy after the standard VQA answer
  normalisation (:func:`normalize_vqa_answer`): with several reference ``answers`` the official
  leave-one-annotator-out ``min(1, matches / 3)``; with one reference, exact match;
* ``text``: greedy answer, scored with ANLS (average normalised Levenshtein similarity,
  threshold 0.5), the DocVQA / TextVQA-OCR metric;
* ``mc``: the option with the highest log-likelihood given image + prompt (summed over the
  option's tokens), scored with accuracy.

Every record also gets ``answer_nll``: the mean negative log-likelihood per token of its
reference answer, a smooth number that moves with quantization error even where accuracy is
flat (e.g. on random tiny models). Greedy decoding and fixed batching make the numbers
deterministic for a given model and batch size.
"""
from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from ..data.processor import encode_prompts, encode_with_continuations, to_device, tokenizer_of
from ..data.vqa_records import load_records
from ..data.vqa_sources import resolve_source

# -- the standard VQA answer normalisation (VQA evaluation code, as used by EvalAI / lmms-eval) ---
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're
whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've""".split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# Kept exactly as in the reference implementation, quirks included: "(?!<=" is a negative
# lookahead (not a lookbehind), and re.UNICODE lands in sub()'s ``count`` argument (= 32).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The VQA challenge's answer normalisation: lower case, punctuation, number words to
    digits, articles dropped, contractions restored."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or _COMMA_STRIP.search(s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy: with n > 1 references, the mean over leave-one-out subsets of
    ``min(1, #matches / 3)``; with one reference, exact match (after normalisation)."""
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        matches = sum(r == pred for j, r in enumerate(refs) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity (best reference), 0 below ``threshold``."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in references:
        gt = " ".join(ref.strip().lower().split())
        length = max(len(gt), len(pred))
        sim = 1.0 if length == 0 else 1.0 - levenshtein(gt, pred) / length
        best = max(best, sim)
    return best if best >= threshold else 0.0


def references(record: dict) -> list[str]:
    return list(record.get("answers") or [record["answer"]])


# -- model calls ------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model, processor, records: list[dict], continuations: list[str],
                          device="cpu") -> list[tuple[float, int, bool]]:
    """Per row: the sum of ``log p(continuation tokens | images, prompt)``, the number of
    continuation tokens, and whether greedy decoding would produce exactly them."""
    batch, spans = encode_with_continuations(processor, records, continuations)
    logits = model(**to_device(batch, device), use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = batch["input_ids"].to(logp.device)
    out = []
    for b, (start, end) in enumerate(spans):
        pos = torch.arange(start, end, device=logp.device)
        greedy = bool((logp[b, pos - 1].argmax(-1) == ids[b, pos]).all())
        out.append((float(logp[b, pos - 1, ids[b, pos]].sum()), end - start, greedy))
    return out


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], max_new_tokens: int, device="cpu") -> list[str]:
    """Greedy answers, cut at the first newline."""
    batch = encode_prompts(processor, records, padding_side="left")
    tok = tokenizer_of(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**to_device(batch, device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate_records(model, processor, records: list[dict], batch_size: int = 8, max_new_tokens: int = 8,
                     device="cpu", progress: bool = True) -> tuple[dict, list[dict]]:
    """Metrics over ``records`` and one result dict per record."""
    model.eval()
    results = {r["id"]: {"id": r["id"], "type": r["type"]} for r in records}
    steps = [("nll", records)] + [(t, [r for r in records if r["type"] == t]) for t in ("open", "text", "mc")]
    bar = tqdm(total=sum(len(rs) for _, rs in steps), desc="mm-eval", disable=not progress, leave=False)
    for step, rs in steps:
        for chunk in _chunks(rs, batch_size):
            if step == "nll":
                for r, (lp, n, _) in zip(chunk, continuation_logprobs(model, processor, chunk,
                                                                   [r["answer"] for r in chunk], device)):
                    results[r["id"]]["answer_nll"] = -lp / n
            elif step == "mc":
                rows = [(r, o) for r in chunk for o in r["options"]]
                scores = []
                for sub in _chunks(rows, batch_size):
                    scores += continuation_logprobs(model, processor, [r for r, _ in sub], [o for _, o in sub], device)
                k = 0
                for r in chunk:
                    lps = [lp for lp, _, _ in scores[k : k + len(r["options"])]]
                    k += len(r["options"])
                    pred = r["options"][max(range(len(lps)), key=lps.__getitem__)]
                    results[r["id"]].update(prediction=pred, score=float(pred == r["answer"]))
            else:
                preds = generate_answers(model, processor, chunk, max_new_tokens, device)
                metric = vqa_accuracy if step == "open" else anls
                for r, p in zip(chunk, preds):
                    results[r["id"]].update(prediction=p, score=metric(p, references(r)))
            bar.update(len(chunk))
    bar.close()
    per = list(results.values())
    metrics = {"answer_nll": sum(x["answer_nll"] for x in per) / len(per), "n": len(per)}
    names = {"open": "vqa_acc", "text": "anls", "mc": "mc_acc"}
    parts = []
    for t, name in names.items():
        scores = [x["score"] for x in per if x["type"] == t]
        metrics[f"n_{t}"] = len(scores)
        if scores:
            metrics[name] = sum(scores) / len(scores)
            parts.append(metrics[name])
    metrics["score"] = sum(parts) / len(parts)  # mean of the per-type metrics present
    return metrics, per


def evaluate_multimodal(model, processor, ecfg, device="cpu", progress=True) -> dict:
    """The ``eval`` config with ``kind: multimodal``: metrics prefixed with ``ecfg.name``."""
    if processor is None:
        raise ValueError("a multimodal evaluation needs the model's processor")
    n = ecfg.get("nsamples")
    records = load_records(resolve_source(ecfg.source, n, ecfg.seed))
    if n and len(records) > n:  # a seeded sample of a larger set, kept in file order
        keep = sorted(random.Random(ecfg.seed).sample(range(len(records)), n))
        records = [records[i] for i in keep]
    metrics, _ = evaluate_records(model, processor, records, batch_size=ecfg.batch_size,
                                  max_new_tokens=ecfg.get("max_new_tokens", 8), device=device, progress=progress)
    return {f"{ecfg.name}.{k}": v for k, v in metrics.items()}
