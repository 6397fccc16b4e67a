"""Text sources through ``datasets``: the ``hf:`` syntax, local data folders for calibration and
perplexity, the one-line offline error, lazy ``import datasets``, and one CLI run on a local folder.
Nothing here touches the network: the hub is offline and every cache points into ``tmp_path``."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from freeact.config import ConfigError
from freeact.validate import validate
from freeact.data import sources
from freeact.data.calib import build_calib_set
from freeact.data.sources import HFSpec, SourceError, parse_hf
from freeact.data.text import read_text, token_stream

REPO = Path(__file__).resolve().parent.parent
MARKER = "zebra quokka xylophone"  # not in the shipped corpora


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every ``datasets`` cache into tmp_path, hub offline; the per-process dataset memo cleared."""
    cache = tmp_path / "hf"
    for var, sub in (("HF_HOME", ""), ("HF_DATASETS_CACHE", "datasets"), ("HF_HUB_CACHE", "hub")):
        monkeypatch.setenv(var, str(cache / sub))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    sources.load_text_dataset.cache_clear()
    yield cache
    sources.load_text_dataset.cache_clear()


def corpus_docs(n=6, chars=3000):
    """``n`` documents from the shipped test text, the marker in the middle of each one."""
    text = read_text("wiki.valid")
    docs = []
    for i in range(n):
        body = text[i * chars:(i + 1) * chars]
        docs.append(f"{body[:chars // 2]} {MARKER} {MARKER} {body[chars // 2:]}")
    return docs


def write_folder(path: Path, fmt: str, docs: list[str], column="text") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        if fmt == "parquet":
            pd.DataFrame({column: part, "id": range(len(part))}).to_parquet(path / f"part-{i}.parquet")
        elif fmt == "jsonl":
            with open(path / f"part-{i}.jsonl", "w", encoding="utf-8") as f:
                for j, d in enumerate(part):
                    f.write(json.dumps({column: d, "id": j}) + "\n")
        elif fmt == "txt":
            for j, d in enumerate(part):
                (path / f"doc-{i}-{j}.txt").write_text(d, encoding="utf-8")
    return path


def contains(stream: torch.Tensor, window: torch.Tensor) -> bool:
    return any(torch.equal(stream[s:s + len(window)], window) for s in range(len(stream) - len(window) + 1))


@pytest.mark.parametrize("source,spec", [
    ("hf:wikitext:wikitext-2-raw-v1:test", HFSpec("wikitext", "wikitext-2-raw-v1", "test")),
    ("hf:mit-han-lab/pile-val-backup::validation", HFSpec("mit-han-lab/pile-val-backup", None, "validation")),
    ("hf:allenai/c4::train@en/c4-train.00000-of-01024.json.gz",
     HFSpec("allenai/c4", None, "train", ("en/c4-train.00000-of-01024.json.gz",))),
    ("hf:allenai/c4:en:validation", HFSpec("allenai/c4", "en", "validation")),
    ("hf:json::train@/d/a.jsonl,/d/b.jsonl", HFSpec("json", None, "train", ("/d/a.jsonl", "/d/b.jsonl"))),
    ("hf:parquet@/d/*.parquet", HFSpec("parquet", None, None, ("/d/*.parquet",))),
    ("hf:imdb", HFSpec("imdb")),
])
def test_parse_hf(source, spec):
    assert parse_hf(source) == spec


@pytest.mark.parametrize("bad", ["hf:", "hf::cfg:split", "hf:a:b:c:d", "hf:wikitext@", "wikitext"])
def test_parse_hf_rejects(bad):
    with pytest.raises(SourceError):
        parse_hf(bad)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt"])
def test_calibration_windows_come_from_a_local_folder(tmp_path, tokenizer, fmt):
    docs = corpus_docs()
    folder = write_folder(tmp_path / f"corpus_{fmt}", fmt, docs)
    text = read_text(str(folder))
    assert text == "\n\n".join(docs)  # all documents, in file order, joined as the shipped corpora are
    stream = token_stream(tokenizer, text)
    calib = build_calib_set(tokenizer, str(folder), nsamples=16, seqlen=64, seed=0)
    assert calib.input_ids.shape == (16, 64)
    for w in calib.targets:
        assert contains(stream, w)  # every window is a piece of the folder's text
    marker = token_stream(tokenizer, " " + MARKER)
    assert any(contains(w, marker) for w in calib.targets), "no calibration window holds the marker"
    shipped = token_stream(tokenizer, read_text("wiki.train"))
    assert not contains(shipped, marker)  # so the marker can only have come from the folder


def test_text_field_names_another_column(tmp_path, tokenizer, compose):
    folder = write_folder(tmp_path / "corpus", "parquet", corpus_docs(4), column="body")
    with pytest.raises(SourceError, match="no 'text' column"):
        read_text(str(folder))
    assert MARKER in read_text(str(folder), text_field="body")
    calib = build_calib_set(tokenizer, str(folder), nsamples=2, seqlen=32, seed=0, text_field="body")
    assert calib.input_ids.shape == (2, 32)
    with pytest.raises(ConfigError, match=r"calib.source=.*no 'text' column"):
        validate(compose([f"calib.source={folder}"]))
    validate(compose([f"calib.source={folder}", "calib.text_field=body"]))


def test_perplexity_from_a_local_source(tmp_path, tokenizer, tiny_model):
    from freeact.eval import evaluate_text
    from freeact.models import get_adapter

    folder = write_folder(tmp_path / "corpus", "jsonl", corpus_docs())
    model = tiny_model("llama")
    ecfg = SimpleNamespace(name="local", source=str(folder), seqlen=32, max_chunks=3, batch_size=4, mc_num=2,
                           seed=0)
    res = evaluate_text(model, get_adapter(model), tokenizer, ecfg, progress=False)
    assert res["local.eval_tokens"] == 3 * 31
    # the same number as perplexity on the folder's text itself, and not the shipped test text's
    from freeact.eval.perplexity import perplexity

    ids = token_stream(tokenizer, "\n\n".join(corpus_docs()))
    assert res["local.ppl"] == pytest.approx(perplexity(model, ids, 32, 4, 3, progress=False)["ppl"])
    ecfg.source = "wiki.test"
    assert evaluate_text(model, get_adapter(model), tokenizer, ecfg, progress=False)["local.ppl"] != res["local.ppl"]


def test_a_hub_dataset_not_cached_offline_is_a_one_line_config_error(compose):
    source = "hf:wikitext:wikitext-2-raw-v1:train"
    with pytest.raises(ConfigError) as e:
        validate(compose([f"calib.source={source}"]))
    msg = str(e.value)
    assert msg.startswith(f"calib.source={source}: dataset 'wikitext' (config wikitext-2-raw-v1, split train) "
                          "is not in the local datasets cache and the hub is offline")
    assert "local folder of parquet/json" in msg and "\n" not in msg


def test_a_folder_with_mixed_formats_is_rejected(tmp_path, compose):
    folder = write_folder(tmp_path / "mixed", "parquet", corpus_docs(2))
    write_folder(folder, "jsonl", corpus_docs(2))
    with pytest.raises(ConfigError, match="must hold files of one format"):
        validate(compose([f"eval.source={folder}"]))


def cli(args, cwd, env_extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run([sys.executable, "-m", "freeact.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_offline_hub_dataset_one_line_exit_2_no_row(tmp_path, isolated_cache):
    env = {"HF_HOME": str(isolated_cache), "HF_DATASETS_CACHE": str(isolated_cache / "datasets"),
           "HF_HUB_CACHE": str(isolated_cache / "hub"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = cli(["model=tiny_llada", "method=rtn", "calib.source=hf:wikitext:wikitext-2-raw-v1:train",
               f"results_file={tmp_path}/r.csv"], tmp_path, env)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("freeact: invalid config: calib.source=hf:wikitext:wikitext-2-raw-v1:train: "
                             "dataset 'wikitext'"), err[0]
    assert "not in the local datasets cache" in err[0]
    assert not (tmp_path / "r.csv").exists()


def test_datasets_is_imported_only_for_dataset_sources(tmp_path):
    code = ("import sys; import freeact.config, freeact.experiment; from freeact.data.text import read_text; "
            "read_text('wiki.test', 100); assert 'datasets' not in sys.modules, 'datasets imported'; "
            f"read_text({str(write_folder(tmp_path / 'c', 'jsonl', corpus_docs(2)))!r}); "
            "assert 'datasets' in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_cli_run_calibrates_and_evaluates_on_a_local_folder(tmp_path, isolated_cache):
    from freeact.tracking.results import read_rows

    folder = write_folder(tmp_path / "corpus", "parquet", corpus_docs())
    env = {"HF_DATASETS_CACHE": str(isolated_cache / "datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = cli(["model=tiny_llada", "method=rtn", f"calib.source={folder}", f"eval.source={folder}",
               "calib.nsamples=4", "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2", "eval.mc_num=2",
               "progress=false", f"results_file={tmp_path}/r.csv"], tmp_path, env)
    assert res.returncode == 0, res.stderr[-3000:]
    df = read_rows(tmp_path / "r.csv")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["calib.source"] == str(folder) and row["eval.source"] == str(folder)
    assert row["status"] == "ok" and row["wiki.eval_tokens"] > 0 and row["wiki.nll"] > 0
