"""Text sources read through 🤗 ``datasets``: hub datasets and local data files or folders.

A text ``source`` (``calib.source`` / ``eval.source``) is one of

* a shipped corpus name (``wiki.train``) or a path to a UTF-8 text file (``.txt``, ``.raw``, ``.gz``,
  any other suffix): read as is (:func:`freeact.data.text.read_text`);
* ``hf:<path>[:<config>][:<split>][@<data_files>]``: ``datasets.load_dataset(path, config,
  split=split, data_files=data_files)``. Examples::

      hf:wikitext:wikitext-2-raw-v1:test                      # the papers' WikiText-2 perplexity
      hf:mit-han-lab/pile-val-backup::validation              # empty config: the default one
      hf:allenai/c4::train@en/c4-train.00000-of-01024.json.gz # one C4 shard, as QuaRot / FlatQuant
      hf:json::train@/data/a.jsonl                            # a packaged builder on local files

  ``<data_files>`` is one file or glob (several: comma-separated, quoted for Hydra). Without a split,
  the dataset must have exactly one. Offline (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``), it
  is read from the datasets cache only;
* a local data folder or file of ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` (optionally
  ``.gz``) files, or a folder of ``.txt`` files (each file one document), or a folder written by
  ``Dataset.save_to_disk``: read with the packaged builder its files' extension names.

Rows are taken from the ``text`` column (``calib.text_field=...`` / ``eval.text_field=...`` for
another) and joined with ``"\\n\\n"``, as the shipped corpora separate documents and as the papers
join WikiText-2's test split for perplexity. ``import datasets`` happens only here, only for these
sources.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hf:"
SEP = "\n\n"
# file suffix -> packaged builder of ``datasets``
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
            ".csv": "csv", ".csv.gz": "csv", ".txt": "text", ".txt.gz": "text"}
FILE_BUILDERS = {"parquet", "json", "csv"}  # a single file with these suffixes goes through ``datasets``
HOW_TO_PROVIDE = ("download it once with network access (the same command without HF_DATASETS_OFFLINE=1 fills the "
                  "cache), or point the source at a local folder of parquet/json/jsonl/csv/txt files")


class SourceError(ValueError):
    """A dataset source that cannot be parsed or loaded; the message is one line."""


@dataclass(frozen=True)
class HFSpec:
    path: str
    config: str | None = None
    split: str | None = None
    data_files: tuple[str, ...] = ()


def parse_hf(source: str) -> HFSpec:
    """``hf:<path>[:<config>][:<split>][@<data_files>]`` -> :class:`HFSpec` (empty parts = None)."""
    if not source.startswith(PREFIX):
        raise SourceError(f"{source!r} does not start with {PREFIX!r}")
    body, _, files = source[len(PREFIX):].partition("@")
    parts = body.split(":")
    if len(parts) > 3 or not parts[0]:
        raise SourceError(f"{source!r}: expected hf:<path>[:<config>][:<split>][@<data_files>]")
    path, config, split = (parts + [""] * 3)[:3]
    data_files = tuple(f.strip() for f in files.split(",") if f.strip())
    if "@" in source and not data_files:
        raise SourceError(f"{source!r}: nothing after '@' (expected data files)")
    return HFSpec(path, config or None, split or None, data_files)


def _suffix(p: Path) -> str:
    s = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    return s if s in BUILDERS else p.suffix.lower()


def local_builder(path: str | Path) -> tuple[str, list[str]] | None:
    """(builder, files) for a local data folder or data file; None for anything else (a plain text
    file or a name, read by :func:`freeact.data.text.read_text`). Raises SourceError for a folder
    without readable data or with mixed formats."""
    p = Path(path).expanduser()
    if p.is_file():
        b = BUILDERS.get(_suffix(p))
        return (b, [str(p)]) if b in FILE_BUILDERS else None
    if not p.is_dir():
        return None
    if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        return "disk", [str(p)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
    kinds = {}
    for f in files:
        if _suffix(f) in BUILDERS:
            kinds.setdefault(BUILDERS[_suffix(f)], []).append(str(f))
    if len(kinds) != 1:
        found = ", ".join(f"{k}: {len(v)} files" for k, v in sorted(kinds.items())) or "no data files"
        raise SourceError(f"data folder {p} must hold files of one format (.parquet, .json/.jsonl, .csv or .txt); "
                          f"found {found}")
    return next(iter(kinds.items()))


def is_dataset_source(source: str) -> bool:
    """True for the sources read through ``datasets`` (``hf:...``, a local data folder or data file)."""
    if str(source).startswith(PREFIX):
        return True
    p = Path(str(source)).expanduser()
    return p.is_dir() or (p.is_file() and BUILDERS.get(_suffix(p)) in FILE_BUILDERS)


def _offline() -> bool:
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False) or getattr(datasets.config, "HF_DATASETS_OFFLINE", False))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _pick_split(ds, what: str):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if len(ds) != 1:
            raise SourceError(f"{what} has splits {sorted(ds)}: name one (hf:<path>:<config>:<split>)")
        return next(iter(ds.values()))
    return ds


def _load_hf(spec: HFSpec, source: str):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    data_files = None
    if spec.data_files:
        files = list(spec.data_files)
        data_files = {spec.split: files} if spec.split else files
    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split, data_files=data_files)
    except (ConnectionError, DatasetNotFoundError, OSError) as e:
        chain, c = [], e
        while c is not None and len(chain) < 16:
            chain.append(c)
            c = c.__cause__ or c.__context__
        network = any(isinstance(x, ConnectionError) or "Couldn't reach" in str(x)
                      or type(x).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
                                              "ConnectTimeout")
                      for x in chain)
        what = f"dataset {spec.path!r} (config {spec.config}, split {spec.split})"
        if network:
            why = ("the hub is offline (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1)" if _offline()
                   else "the hub cannot be reached (no network)")
            raise SourceError(f"{what} is not in the local datasets cache and {why}; {HOW_TO_PROVIDE}") from None
        if isinstance(e, DatasetNotFoundError):
            raise SourceError(f"{what} is not on the hub (or not accessible) nor in the local datasets cache; "
                              f"{HOW_TO_PROVIDE}") from None
        raise SourceError(f"cannot load dataset {spec.path!r}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 (a bad split, data files that match nothing, ...: one line)
        hint = f" (do the data files {', '.join(spec.data_files)} exist?)" if spec.data_files else ""
        raise SourceError(f"cannot load dataset {spec.path!r}: {_first_line(e)}{hint}") from None
    return _pick_split(ds, f"dataset {spec.path!r}")


def _load_local(builder: str, files: list[str], source: str):
    import datasets

    try:
        if builder == "disk":
            ds = datasets.load_from_disk(files[0])
        elif builder == "text":  # a folder of .txt files: each file one document
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # noqa: BLE001 (any reader error: one line naming the source)
        raise SourceError(f"cannot read {source} with the {builder!r} builder: {_first_line(e)}") from None
    return _pick_split(ds, source)


@functools.lru_cache(maxsize=8)
def load_text_dataset(source: str, text_field: str = "text"):
    """The ``datasets.Dataset`` behind ``source`` (cached per process: validation loads it once, the
    run reuses it). Raises SourceError (one line) if it cannot be had or has no ``text_field`` column."""
    if source.startswith(PREFIX):
        ds = _load_hf(parse_hf(source), source)
    else:
        found = local_builder(source)
        if found is None:
            raise SourceError(f"{source} is neither a data folder nor a .parquet/.json/.jsonl/.csv file")
        ds = _load_local(*found, source)
    if text_field not in ds.column_names:
        raise SourceError(f"has no {text_field!r} column (columns: {ds.column_names}); "
                          f"name the text column with calib.text_field=... / eval.text_field=...")
    return ds


def documents(source: str, text_field: str = "text"):
    """The source's documents (rows of its text column), in order."""
    ds = load_text_dataset(source, text_field)
    for batch in ds.select_columns([text_field]).iter(batch_size=1000):
        for t in batch[text_field]:
            yield "" if t is None else str(t)


def dataset_text(source: str, max_chars: int | None = None, text_field: str = "text") -> str:
    """All documents joined with ``"\\n\\n"`` (the first ``max_chars`` characters if given)."""
    if not max_chars:
        return SEP.join(documents(source, text_field))
    out, n = [], 0
    for doc in documents(source, text_field):
        out.append(doc)
        n += len(doc) + len(SEP)
        if n >= max_chars:
            break
    return SEP.join(out)[:max_chars]
