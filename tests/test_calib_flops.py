"""experiments/calib_flops.py: its matrix-product count, and the per-token costs it finds for a tiny layer
against the ones written out by hand."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import calib_flops as cf  # noqa: E402


def test_matmul_flops_counts_two_m_n_k_by_dtype():
    a32, b32 = torch.randn(3, 5), torch.randn(5, 7)
    a64 = torch.randn(2, 3, 4, dtype=torch.float64)
    with cf.MatmulFlops() as c:
        a32 @ b32  # mm: 2 * 3 * 5 * 7
        torch.addmm(torch.zeros(3, 7), a32, b32)
        torch.bmm(a64, torch.randn(2, 4, 6, dtype=torch.float64))  # 2 x (2 * 3 * 4 * 6)
        a32 + 1  # not a product
    assert c.flops == {"float32": 2 * 2 * 3 * 5 * 7, "float64": 2 * 2 * 3 * 4 * 6}


def test_per_token_costs_of_a_tiny_layer_are_the_full_precision_pass_and_freeacts_covariances():
    d, ffn, hd = 256, 592, 64  # bench_cost.TINY on llada: 4 heads, 2 KV heads
    fp_pass = 2 * (d * d + 2 * d * 2 * hd + d * d + 3 * d * ffn)  # q, k, v, o, gate, up, down (attention in SDPA)
    covariances = 2 * (3 * d * d + ffn * ffn)  # float64, per type: q/k/v, o, gate/up inputs (d), down input (ffn)
    flat = cf.fixed_and_per_token("llada_8b", "flatquant", seqlen=16, tiny=True)
    free = cf.fixed_and_per_token("llada_8b", "freeact", seqlen=16, tiny=True)
    assert flat["float32"][1] == fp_pass and free["float32"][1] == fp_pass
    assert flat["float64"][1] == 0 and free["float64"][1] == covariances
