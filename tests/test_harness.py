"""The lm-eval bridge: offline tasks, the dLLM likelihood / sampler, code execution, the config."""
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from freeact.eval.elbo import masked_token_nll
from freeact.eval.harness import TASKS_DIR, flatten_results, local_task_names, materialize_tasks, run_harness
from freeact.eval.sampling import diffusion_generate, transfer_schedule
from freeact.eval.tasks.utils import check_completion, process_code_results
from freeact.models import get_adapter
from conftest import conf_model

FAST = dict(limit=2, num_fewshot=0, batch_size=16, mc_num=2, gen_length=8, steps=8, block_length=4, progress=False)


@pytest.fixture(scope="module")
def llada(tokenizer):
    return conf_model("tiny_llada", tokenizer)


def dllm(model, tokenizer, **kw):
    from freeact.eval.diffusion_lm import DiffusionLM

    return DiffusionLM(model, get_adapter(model), tokenizer, progress=False, **kw)


def ll_requests(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


# -- tasks and lm-eval ----------------------------------------------------------------------
def test_local_tasks_resolve_their_data_from_any_directory(tmp_path, monkeypatch):
    assert local_task_names() == ["freeact_gsm8k", "freeact_humaneval", "freeact_mc", "freeact_mmlu_dev"]
    out = materialize_tasks(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)  # relative data_files would now miss
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(out), include_defaults=False).load(local_task_names())["tasks"]
    sizes = {name: len(list(t.test_docs())) for name, t in tasks.items()}
    assert sizes == {"freeact_mc": 32, "freeact_mmlu_dev": 282, "freeact_gsm8k": 1319, "freeact_humaneval": 12}
    mmlu = tasks["freeact_mmlu_dev"]
    doc = next(iter(mmlu.test_docs()))
    assert mmlu.doc_to_text(doc).endswith("D. False, True\nAnswer:") and mmlu.doc_to_choice(doc) == list("ABCD")
    assert mmlu.doc_to_target(doc) == 2  # "Statement 1 | Every element of a group generates a cyclic subgroup"
    shipped = yaml.safe_load((out / "freeact_mc.yaml").read_text())["dataset_kwargs"]["data_files"]["test"]
    assert Path(shipped).is_absolute() and Path(shipped).exists()
    assert tasks["freeact_humaneval"].config.process_results is process_code_results  # !function survived


def test_user_task_folder_with_relative_data_and_helpers(tmp_path, monkeypatch):
    user = tmp_path / "mine" / "sub"
    user.mkdir(parents=True)
    (user / "d.jsonl").write_text('{"q": "1+1", "a": 0}\n{"q": "2+2", "a": 1}\n')
    (user / "utils.py").write_text("def shout(ds):\n    return ds.map(lambda d: {'q': d['q'] + '?'})\n")
    (user / "t.yaml").write_text("task: my_task\ndataset_path: json\n"
                                 "dataset_kwargs:\n  data_files:\n    test: d.jsonl\n"
                                 "output_type: multiple_choice\ntest_split: test\nprocess_docs: !function utils.shout\n"
                                 "doc_to_text: '{{q}} ='\ndoc_to_choice: ['2', '4']\ndoc_to_target: a\n")
    out = materialize_tasks(tmp_path / "copy", tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(out), include_defaults=False).load(["my_task"])["tasks"]["my_task"]
    assert [task.doc_to_text(d) for d in task.test_docs()] == ["1+1? =", "2+2? ="]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llada"])
def test_ar_and_dllm_run_mc_and_generation_tasks(name, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = conf_model(name, tokenizer)
    res = run_harness(model, get_adapter(model), tokenizer, ["freeact_mc", "freeact_gsm8k"], **FAST)
    for key in ("freeact_mc.acc", "freeact_mc.acc_norm", "freeact_gsm8k.exact_match.strict-match",
                "freeact_gsm8k.exact_match.flexible-extract"):
        assert isinstance(res[key], float) and 0.0 <= res[key] <= 1.0, key
    assert res["freeact_mc.n"] == 2 and res["freeact_gsm8k.n"] == 2


def test_ar_multiple_choice_accuracy_equals_a_hand_computed_reference(tokenizer, tmp_path, monkeypatch):
    """acc / acc_norm of freeact_mc through lm-eval against the published rule computed by hand: each choice
    scored by the summed log-probability of " " + its text after the prompt (acc_norm: divided by its length
    in characters), the argmax compared with the answer key."""
    monkeypatch.chdir(tmp_path)
    model = conf_model("tiny_llama", tokenizer)
    n = 8
    res = run_harness(model, get_adapter(model), tokenizer, ["freeact_mc"], **{**FAST, "limit": n})
    docs = [json.loads(line) for line in (TASKS_DIR / "data" / "mc.jsonl").read_text().splitlines()[:n]]
    acc, acc_norm = [], []
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        ctx_ids = tokenizer.encode(ctx, add_special_tokens=False)
        lls = []
        for choice in d["choices"]["text"]:
            cont = tokenizer.encode(ctx + " " + choice, add_special_tokens=False)[len(ctx_ids):]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx_ids + cont[:-1]])).logits[0, len(ctx_ids) - 1:]
            lls.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum()))
        target = d["choices"]["label"].index(d["answerKey"])
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"]["text"][i]))
        acc.append(best == target)
        acc_norm.append(best_norm == target)
    assert res["freeact_mc.n"] == n
    assert res["freeact_mc.acc"] == pytest.approx(sum(acc) / n)
    assert res["freeact_mc.acc_norm"] == pytest.approx(sum(acc_norm) / n)


def test_flatten_results_names():
    raw = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.25,
                             "exact_match_stderr,strict-match": "N/A"}},
           "n-samples": {"t": {"original": 9, "effective": 3}}}
    assert flatten_results(raw) == {"t.acc": 0.5, "t.acc_stderr": 0.1, "t.exact_match.strict-match": 0.25, "t.n": 3}


# -- dLLM likelihood ------------------------------------------------------------------------
def test_single_token_likelihood_is_exact(tokenizer):
    """One target token: every draw masks exactly it with p_mask = 1, so the estimate is the exact
    log p(token | context) for any seed (Dream: read from the previous position's logits)."""
    for name in ("tiny_llada", "tiny_dream"):
        model = conf_model(name, tokenizer, torch.float64)
        lm = dllm(model, tokenizer, mc_num=3, seed=5, likelihood="llada")  # Dream defaults to its own
        ctx, cont = lm.encode_pair("The cat sat in the", " house")
        assert len(cont) == 1
        ids = torch.tensor([ctx + cont])
        ids[0, -1] = model.config.mask_token_id
        logits = get_adapter(model).logits(model(input_ids=ids))[0, -1]
        exact = torch.log_softmax(logits, -1)[cont[0]].item()
        (ll, greedy), = lm.loglikelihood(ll_requests([("The cat sat in the", " house")]))
        assert ll == pytest.approx(exact, rel=1e-5), name
        assert greedy == (logits.argmax().item() == cont[0])


def test_likelihood_is_seeded_batch_independent_and_variance_shrinks_with_mc_num(llada, tokenizer):
    pair = ("Bees collect", " nectar from flowers")
    others = [("Short one.", " yes"), ("A somewhat longer context sentence goes here, " * 3, " and an answer")]
    a = dllm(llada, tokenizer, mc_num=8, seed=1).loglikelihood(ll_requests([pair]))[0][0]
    b = dllm(llada, tokenizer, mc_num=8, seed=1, batch_size=5).loglikelihood(ll_requests(others + [pair]))[2][0]
    c = dllm(llada, tokenizer, mc_num=8, seed=2).loglikelihood(ll_requests([pair]))[0][0]
    assert a == pytest.approx(b, rel=1e-5)  # same seed: same masks, whatever shares the batch
    assert a != c
    spread = {}
    for mc in (4, 64):
        vals = [dllm(llada, tokenizer, mc_num=mc, seed=s, batch_size=64).loglikelihood(ll_requests([pair]))[0][0]
                for s in range(10)]
        spread[mc] = statistics.variance(vals)
    assert spread[4] > 4 * spread[64] > 0, spread  # 1/mc_num would give 16x


def test_restricted_logits_and_padding_leave_scores_unchanged(tokenizer):
    for name in ("tiny_llada", "tiny_dream"):
        model = conf_model(name, tokenizer, torch.float64)
        g = torch.Generator().manual_seed(0)
        rows = []
        for L in (12, 20, 7):
            ids = torch.randint(2, 4000, (L,), generator=g)
            mask = torch.rand(L, generator=g) < 0.5
            mask[:2] = True  # position 0 too: Dream scores it from its own output, as adapter.logits does
            rows.append((ids, mask))
        fast = masked_token_nll(model, get_adapter(model), rows, batch_size=3, restrict_logits=True)
        ref = masked_token_nll(model, get_adapter(model), rows, batch_size=1, restrict_logits=False)
        for (ce, hit), (ce_ref, hit_ref) in zip(fast, ref):
            torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-6)
            assert torch.equal(hit, hit_ref)


def test_rolling_likelihood_scores_every_token_once(llada, tokenizer):
    from lm_eval.api.instance import Instance

    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    lm = dllm(llada, tokenizer, mc_num=4, max_length=32)  # several windows
    assert n > 2 * 32
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    per_token = -ll / n
    assert abs(per_token - math.log(len(tokenizer))) < 1.5  # a random model: ~uniform, each token once


# -- dLLM generation ------------------------------------------------------------------------
class ScriptedModel(torch.nn.Module):
    """Logits that make token ``100 + j`` the prediction at answer position j, with confidence
    growing with j; records each forward's input ids."""

    def __init__(self, prompt_len, vocab=256):
        super().__init__()
        self.prompt_len, self.vocab, self.calls = prompt_len, vocab, []
        self.config = SimpleNamespace(pad_token_id=0)

    def forward(self, input_ids, **kw):
        self.calls.append(input_ids.clone())
        b, L = input_ids.shape
        logits = torch.zeros(b, L, self.vocab)
        for j in range(L - self.prompt_len):
            logits[:, self.prompt_len + j, 100 + j] = 1.0 + j
        return SimpleNamespace(logits=logits)


def scripted_adapter(model):
    return SimpleNamespace(mask_token_id=1, shift_logits=False, config=model.config, logits=lambda out: out.logits)


@pytest.mark.parametrize("rule", ["low_confidence", "entropy"])
def test_sampler_unmasks_most_confident_first_within_blocks(rule):
    model = ScriptedModel(prompt_len=3)
    out = diffusion_generate(model, scripted_adapter(model), [[5, 6, 7]], gen_length=4, steps=4, block_length=2,
                             remasking=rule)
    assert out.tolist() == [[100, 101, 102, 103]]
    committed = [(c[0, 3:] != 1).nonzero().flatten().tolist() for c in model.calls[1:]] + [[0, 1, 2, 3]]
    # block 0 first (position 1 is more confident than 0), then block 1 (3 before 2)
    assert committed == [[1], [0, 1], [0, 1, 3], [0, 1, 2, 3]]
    assert transfer_schedule(5, 3) == [2, 2, 1]


def test_generation_batch_equals_one_by_one_and_cuts_at_stop_strings(tokenizer):
    for name in ("tiny_llada", "tiny_dream"):
        model = conf_model(name, tokenizer)
        adapter = get_adapter(model)
        prompts = [tokenizer("Question: 2 plus 2?\nAnswer:")["input_ids"], tokenizer("Hi")["input_ids"]]
        both = diffusion_generate(model, adapter, prompts, gen_length=4, steps=4, block_length=2)
        alone = [diffusion_generate(model, adapter, [p], gen_length=4, steps=4, block_length=2)[0] for p in prompts]
        assert torch.equal(both, torch.stack(alone)), name
    lm = dllm(model, tokenizer, gen_length=8, steps=8, block_length=4)
    ids = torch.tensor(tokenizer("The answer is 4. Question: next")["input_ids"])
    assert lm._decode(ids, ["Question:"]) == "The answer is 4. "
    assert lm._decode(torch.cat([ids[:3], torch.tensor([tokenizer.eos_token_id]), ids[3:]]), []) == \
        tokenizer.decode(ids[:3])


def test_bad_sampler_settings_are_rejected(llada, tokenizer):
    with pytest.raises(ValueError, match="block_length=3 must divide gen_length=8"):
        dllm(llada, tokenizer, gen_length=8, steps=8, block_length=3)
    with pytest.raises(ValueError, match="steps=3 must be a positive multiple"):
        dllm(llada, tokenizer, gen_length=8, steps=3, block_length=4)


# -- code execution -------------------------------------------------------------------------
def test_code_task_executes_with_a_time_limit():
    docs = [json.loads(line) for line in (TASKS_DIR / "data" / "humaneval.jsonl").read_text().splitlines()]
    for doc in docs:  # the fixture's reference solutions pass their own tests
        assert check_completion(doc, doc["canonical_solution"]).passed, doc["task_id"]
    add = docs[0]
    assert process_code_results(add, ["    return a + b\n"]) == {"pass@1": 1.0}
    wrong = check_completion(add, "    return a - b\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    loop = check_completion(add, "    while True:\n        pass\n", timeout=1.0)
    assert loop.status == "timeout"


# -- config ---------------------------------------------------------------------------------
def test_harness_config_validates_and_runs_through_the_experiment(compose, tmp_path, monkeypatch):
    from freeact.config import ConfigError
    from freeact.validate import validate

    validate(compose(["eval=harness"]))
    with pytest.raises(ConfigError, match="eval: block_length=5 must divide gen_length=32"):
        validate(compose(["eval=harness", "eval.block_length=5"]))
    with pytest.raises(ConfigError, match="remasking"):
        validate(compose(["eval=harness", "eval.remasking=bogus"]))

    from freeact.experiment import run_experiment

    monkeypatch.chdir(tmp_path)
    cfg = compose(["model=tiny_llada", "method=fp16", "eval=harness", "eval.text=false", "eval.tasks=[freeact_mc]",
                   "eval.limit=2", "eval.mc_num=2", "progress=false"])
    row, _ = run_experiment(cfg, validate(cfg), "test")
    assert 0.0 <= row["freeact_mc.acc"] <= 1.0 and row["freeact_mc.n"] == 2
    assert not any(k.startswith("wiki.") for k in row)  # text: false skips the text metric


def test_unknown_task_names_are_refused_with_their_near_misses(tmp_path):
    """A misspelt task fails validation (before any model loads) with lm-eval's close names; shipped and
    include_path tasks pass without scanning lm-eval's library."""
    from freeact.eval.harness import check_task_names, local_tasks

    user = tmp_path / "tasks"
    user.mkdir()
    src = next(TASKS_DIR.glob("*.yaml"))
    (user / "mine.yaml").write_text(src.read_text().replace(f"task: {yaml.safe_load(src.read_text())['task']}",
                                                            "task: my_local_task"))
    assert "my_local_task" in local_tasks(user)
    check_task_names(SimpleNamespace(tasks=["freeact_mc", "my_local_task"], include_path=str(user)))
    with pytest.raises(ValueError, match=r"task 'freeact_mcc' is not in lm-eval \(did you mean freeact_mc"):
        check_task_names(SimpleNamespace(tasks=["freeact_mc", "freeact_mcc"], include_path=None))
    with pytest.raises(ValueError, match=r"task 'zzzq' is not in lm-eval; the offline tasks are \["):
        check_task_names(SimpleNamespace(tasks=["zzzq"], include_path=None))
