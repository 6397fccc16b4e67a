"""Per-forward token types (dLLM: mask / unmasked; MLLM: vision / text; or any N-way split).

A :class:`TokenTypes` object belongs to one model. A forward pre-hook on the model (the module
the user calls, so a VLM wrapper sees ``input_ids`` even when its language model only gets
embeddings) computes a ``(batch, seq)`` tensor of type indices from ``input_ids`` once per
forward and stores it in ``current``; every typed transform holds a reference to the same
object and reads ``current`` when it runs. Block-wise calibration, which calls decoder layers
directly, sets the tensor with :meth:`TokenTypes.use`. No module-level global is involved.

Rules: an ordered list of ``(name, ids)``; a token takes the first type whose ids contain it;
exactly one type has no ids and takes every other token.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class TokenTypes:
    def __init__(self, rules: list[tuple[str, list[int] | None]]):
        defaults = [n for n, ids in rules if not ids]
        if len(defaults) != 1:
            raise ValueError(f"exactly one token type must have no ids (the rest); got {rules}")
        self.names = [n for n, _ in rules]
        self.rules = [(i, torch.tensor(sorted(ids), dtype=torch.long)) for i, (_, ids) in enumerate(rules) if ids]
        self.default = self.names.index(defaults[0])
        self.current: torch.Tensor | None = None
        self._handles = []

    def spec(self) -> list[tuple[str, list[int] | None]]:
        """The rules as given to the constructor (names with their ids; the rest without): ``TokenTypes(t.spec())``
        rebuilds ``t``."""
        ids = {i: [int(v) for v in t.tolist()] for i, t in self.rules}
        return [(n, ids.get(i)) for i, n in enumerate(self.names)]

    @property
    def num_types(self) -> int:
        return len(self.names)

    def compute(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The type of every token. Tensor ops only, with the rules' ids kept on the input's device: no host
        synchronisation and no copy from the host per forward (so a forward can be captured in a CUDA graph)."""
        types = torch.full_like(input_ids, self.default)
        assigned = torch.zeros_like(input_ids, dtype=torch.bool)
        for idx, ids in self._rules_on(input_ids.device):
            hit = torch.isin(input_ids, ids) & ~assigned
            types = torch.where(hit, idx, types)
            assigned |= hit
        return types

    def _rules_on(self, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        cache = self.__dict__.setdefault("_rules_by_device", {})
        if device not in cache:
            cache[device] = [(i, ids.to(device)) for i, ids in self.rules]
        return cache[device]

    def get(self) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("token types are not set: call the model with input_ids, or use TokenTypes.use()")
        return self.current

    @contextmanager
    def use(self, types: torch.Tensor | None):
        prev, self.current = self.current, types
        try:
            yield
        finally:
            self.current = prev

    def counts(self, types: torch.Tensor) -> dict[str, int]:
        return {n: int((types == i).sum()) for i, n in enumerate(self.names)}

    # -- attach to a model -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "TokenTypes":
        def pre(_, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.current = self.compute(ids)

        def post(*_):
            self.current = None

        self.detach()
        self._handles = [model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post)]
        model.freeact_token_types = self
        return self

    def __getstate__(self):  # hooks and the live tensor are per process; rules are the state
        state = dict(self.__dict__)
        state.update(current=None, _handles=[])
        return state

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def rules_from_names(adapter, names: list[str]) -> list[tuple[str, list[int] | None]]:
    """Turn configured type names into rules using the ids the adapter knows
    (e.g. ``["mask", "unmasked"]`` for a dLLM, ``["vision", "text"]`` for an MLLM)."""
    known = adapter.token_type_ids()
    rules = []
    for n in names:
        ids = known.get(n)
        if ids is not None and any(i is None for i in ids):
            raise ValueError(f"token type {n!r}: the model config has no id for it")
        rules.append((n, ids))
    unknown = [n for n, ids in rules if ids is None]
    if len(unknown) != 1:
        raise ValueError(f"token types {names}: the model defines ids for {sorted(known)}; "
                         f"exactly one other name may stand for the remaining tokens, got {unknown}")
    return rules
