"""A/B of the fused activation kernel: an earlier ``freeact/kernels/act_quant.py`` against the current one, on one
GPU, timed in alternation in one process (replayed from CUDA graphs, inputs rotating past the L2 cache, median of
``--rounds``), with each one's share of tokens whose 4-bit output differs from the eager pipeline.

    git show COMMIT:freeact/kernels/act_quant.py > /tmp/act_quant_old.py
    PYTHONPATH=. python experiments/kernel_ab.py /tmp/act_quant_old.py [--widths 4096,3584] [--tokens 2048,8192,32768]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_kernels as bk  # noqa: E402
import freeact.kernels.act_quant as current  # noqa: E402
from freeact.transforms.affine import most_square_factors, random_orthogonal  # noqa: E402


def load_old(path: str):
    """The older module, imported inside the package so that its relative imports resolve."""
    spec = importlib.util.spec_from_file_location("freeact.kernels._act_quant_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="an earlier act_quant.py")
    ap.add_argument("--widths", default="4096,3584")
    ap.add_argument("--tokens", default="2048,8192,32768")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_ab needs a CUDA GPU")
    old, dev = load_old(args.old), "cuda"
    base = bk.env_info()
    print(f"device: {base['device']} | torch {base['torch']} | triton {base['triton']} | commit {base['commit']} "
          f"| old: {args.old}", flush=True)
    for d in (int(w) for w in args.widths.split(",")):
        d_l, d_r = most_square_factors(d)
        for T in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator().manual_seed(0)
            P_l = random_orthogonal(d_l, g).float().to(dev)
            P_r = random_orthogonal(d_r, g).float().to(dev)
            s = (torch.rand(d, generator=g) + 0.5).to(dev)
            masks = (torch.rand(2, d, generator=g) > 0.05).float().to(dev)
            types = torch.randint(0, 2, (T,), generator=g).to(dev)
            xs = bk.Rotating(lambda: torch.randn(T, d, device=dev).bfloat16(), T * d * 2)
            ops = {"old": old.KronActQuant(P_l, P_r, in_scale=s, masks=masks),
                   "new": current.KronActQuant(P_l, P_r, in_scale=s, masks=masks)}
            x = xs.items[0]
            ref = current.act_quant_eager(x, P_l, P_r, masks, types, bits=4, clip=0.9, in_scale=s).float()
            step = (ref.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
            differ = {k: float(((op(x, types, bits=4, clip=0.9, backend="triton").float() - ref).abs() / step > 1e-3)
                                .any(-1).float().mean()) for k, op in ops.items()}
            got = {k: [] for k in ops}
            for _ in range(args.rounds):
                for k, op in ops.items():
                    got[k].append(bk.graph_ms([lambda x=x, op=op: op(x, types, bits=4, clip=0.9, backend="triton")
                                               for x in xs.items]))
            ms = {k: statistics.median(v) for k, v in got.items()}
            tbs = {k: 2 * T * d * 2 / (v * 1e-3) / 1e12 for k, v in ms.items()}
            print(f"d={d} ({d_l}x{d_r}) T={T}: old {ms['old'] * 1e3:.1f} us ({tbs['old']:.2f} TB/s) | new "
                  f"{ms['new'] * 1e3:.1f} us ({tbs['new']:.2f} TB/s) | old/new {ms['old'] / ms['new']:.2f}x | tokens "
                  f"differing from eager: old {differ['old']:.2e}, new {differ['new']:.2e}", flush=True)


if __name__ == "__main__":
    main()
