"""Text data: the shipped corpora, calibration windows, and dLLM masking.

Shipped corpora live in ``freeact/assets/text`` (see its LICENSES.md); ``source`` is either the
name of one of those files without ``.txt`` (``wiki.train``) or a path to any UTF-8 file; or a source
read through ``datasets`` (``hf:<path>[:<config>][:<split>][@<data_files>]``, a local folder or file of
parquet / json / jsonl / csv / txt data): see :mod:`freeact.data.sources`. Every source becomes one string
through :func:`read_text` (documents joined with ``"\\n\\n"``).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the tensor functions: the config checks read sources without it
    import torch

TEXT_DIR = Path(__file__).resolve().parent.parent / "assets" / "text"


def text_path(source: str) -> Path:
    p = Path(source).expanduser()
    if p.exists():
        return p
    for cand in (TEXT_DIR / f"{source}.txt", TEXT_DIR / f"{source}.txt.gz", TEXT_DIR / source):
        if cand.exists():
            return cand
    names = sorted(f.name.split(".txt")[0] for f in TEXT_DIR.glob("*.txt*"))
    raise FileNotFoundError(f"text source {source!r} is neither a file nor a shipped corpus ({names})")


def read_text(source: str, max_chars: int | None = None, text_field: str = "text") -> str:
    """The whole text of ``source`` (its first ``max_chars`` characters if given). ``text_field``:
    the column read from a dataset source (ignored for text files)."""
    from .sources import dataset_text, is_dataset_source  # imports ``datasets`` only for such sources

    if is_dataset_source(source):
        return dataset_text(source, max_chars, text_field)
    p = text_path(source)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return f.read(max_chars) if max_chars else f.read()


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D tensor (no special tokens)."""
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens from a token stream: the calibration set."""
    import torch

    if ids.numel() <= seqlen:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def chunks(ids: torch.Tensor, seqlen: int, max_chunks: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows (the papers' perplexity protocol)."""
    n = ids.numel() // seqlen
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def mask_tokens(ids: torch.Tensor, mask_id: int, generator: torch.Generator,
                t_min: float = 0.0, t_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked-diffusion forward process: per sequence a ratio ``t ~ U(t_min, t_max)``, each
    position masked with probability ``t``. Returns (masked ids, t per sequence)."""
    import torch

    b, l = ids.shape
    t = t_min + (t_max - t_min) * torch.rand(b, generator=generator)
    masked = torch.rand(b, l, generator=generator) < t[:, None]
    return torch.where(masked, torch.full_like(ids, mask_id), ids), t
