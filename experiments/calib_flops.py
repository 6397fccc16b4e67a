"""Matrix-product FLOPs of one decoder layer's calibration outside the training steps, by dtype, on the CPU.

The GPU time of a learned method's layer is its training steps plus what runs around them: the
full-precision pass (targets, statistics), building the transforms, the merge. This counts the matrix
products of that second part (``epochs=0``: the same build, statistics and merge, no step), split into the
part that grows with the calibration tokens and the part that does not, by running one layer at two token
counts. At the published 128 x 2048 tokens, float32 and float64 FLOPs divided by the GPU's rates for each give
the expected time, to set against ``bench_cost.py``'s measured non-training time. It counts, it does not time:
no GPU is needed, and the widths are the real ones (``--tiny`` for a quick check).

    PYTHONPATH=. python experiments/calib_flops.py --models dream_7b --methods freeact,flatquant
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import bench_cost as bc  # noqa: E402  (the models, calibration sets and method settings it times)

from freeact.methods import QuantContext, get_method  # noqa: E402
from freeact.models import get_adapter  # noqa: E402

aten = torch.ops.aten
# (operator, positions of its two matrix operands)
PRODUCTS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}


class MatmulFlops(TorchDispatchMode):
    """Counts ``2 m n k`` (times the batch) for every matrix product dispatched while active, by dtype."""

    def __init__(self):
        super().__init__()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ops = PRODUCTS.get(func.overloadpacket)
        if ops is not None:
            a, b = args[ops[0]], args[ops[1]]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops[str(a.dtype).removeprefix("torch.")] += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


def layer_flops(model_name: str, method: str, tokens_per_seq: int, nsamples: int = 4, tiny: bool = False) -> dict:
    """Matrix-product FLOPs by dtype of one layer's calibration at ``epochs=0`` (``nsamples`` sequences)."""
    model = bc.build_model(model_name, 1, "cpu", tiny=tiny)
    calib = bc.calib_set(model_name, model, nsamples, tokens_per_seq)
    ctx = QuantContext(model, get_adapter(model), bc.w4a4(), calib, device="cpu", batch_size=4, seed=0, progress=False)
    with MatmulFlops() as counter:
        get_method(method, bc.method_cfg(method, model_name, 0)).apply(ctx)
    return dict(counter.flops)


def fixed_and_per_token(model_name: str, method: str, seqlen: int = 128, tiny: bool = False) -> dict:
    """Per dtype ``(fixed, per_token)`` FLOPs from two runs at ``seqlen`` and ``2 seqlen`` tokens a sequence."""
    a, b = layer_flops(model_name, method, seqlen, tiny=tiny), layer_flops(model_name, method, 2 * seqlen, tiny=tiny)
    extra = 4 * seqlen  # the second run's added tokens (4 sequences)
    return {k: (a.get(k, 0) - (b.get(k, 0) - a.get(k, 0)), (b.get(k, 0) - a.get(k, 0)) / extra) for k in a.keys() | b.keys()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llada_8b,dream_7b")
    ap.add_argument("--methods", default="freeact,flatquant")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens to extrapolate to")
    ap.add_argument("--seqlen", type=int, default=128, help="tokens a sequence of the first counted run")
    ap.add_argument("--tiny", action="store_true", help="bench_cost's small widths (a quick check)")
    a = ap.parse_args(argv)
    print(f"matrix-product TFLOP of one layer's calibration outside its steps (epochs 0), at {a.tokens} tokens")
    print("| model | method | dtype | fixed | per 1k tokens | total |\n|---|---|---|---|---|---|")
    for model_name in a.models.split(","):
        for method in a.methods.split(","):
            for dtype, (fixed, per_token) in sorted(fixed_and_per_token(model_name, method, a.seqlen, a.tiny).items()):
                total = fixed + per_token * a.tokens
                print(f"| {model_name} | {method} | {dtype} | {fixed / 1e12:.3f} | {per_token * 1024 / 1e12:.4f} | "
                      f"{total / 1e12:.2f} |", flush=True)


if __name__ == "__main__":
    main()
