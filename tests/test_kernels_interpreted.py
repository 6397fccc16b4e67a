"""The Triton kernels themselves, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``, float32),
against the eager math they replace: the fused Kronecker transform + type mask + per-token quantization in
its three modes, with one and several tokens per program (a token count that is no multiple of it), persistent
programs striding over the tokens, padded
factors, a two-pass tile (column blocks chosen through ``tuning``), the non-power-of-two Hadamard through the kernel,
and the per-token quantizer without a transform. The interpreter must be
chosen before Triton compiles anything, so each case runs in a fresh Python process. Skipped without Triton
(``pip install triton``: part of the ``dev`` extra on Linux)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the kernels' interpreter tests need triton (pip install triton)")

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import json, sys, torch
    import freeact.kernels.act_quant as aq
    from freeact.kernels import hadamard_transform
    from freeact.transforms.affine import random_orthogonal
    from freeact.transforms.hadamard import fast_hadamard_transform
    assert aq.triton_available(), "the interpreter is not on"
    case = json.loads(sys.argv[1])
    g = torch.Generator().manual_seed(case["seed"])
    out = {}
    if case["kind"] == "row":
        x = torch.randn(case["T"], case["d"], generator=g)
        x[:, 1] *= 20  # an outlier channel
        x[-1] = 0  # an all-zero token
        y = aq.fused_row_quant(x, bits=4, clip=0.9, backend="triton", block=case["block"])
        ref = aq.row_quant_eager(x, bits=4, clip=0.9)
        out["equal"] = bool(torch.equal(y, ref))
        out["levels"] = int(torch.unique(ref[0]).numel())
    elif case["kind"] == "hadamard":
        x = torch.randn(case["T"], case["n"], generator=g)
        y = hadamard_transform(x, backend="triton")
        ref = fast_hadamard_transform(x.double(), scale=True, backend="torch")
        out["rel"] = float((y.double() - ref).norm() / ref.norm())
    else:
        d_l, d_r, T = case["d_l"], case["d_r"], case["T"]
        d = d_l * d_r
        x = torch.randn(T, d, generator=g)
        x[:, 1] *= 20  # an outlier channel
        P_l, P_r = random_orthogonal(d_l, g).float(), random_orthogonal(d_r, g).float()
        s = torch.rand(d, generator=g) + 0.5
        masks = (torch.rand(3, d, generator=g) > 0.2).float() if case["masked"] else None
        if case["masked"] == "owner":  # FreeAct's form: shared, unique to one type, a few kept by none
            own = torch.randint(-2, 3, (d,), generator=g)
            masks = torch.stack([((own == -1) | (own == k)).float() for k in range(3)])
        types = torch.randint(0, 3, (T,), generator=g) if case["masked"] else None
        tuning = {"tokens_per_prog": case["tpp"], "BN": case.get("BN")}  # BN < padded d_r: two passes
        op = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning=tuning)
        y = op(x, types, bits=16, backend="triton")
        y_ref = aq.act_quant_eager(x, P_l, P_r, masks, types, bits=16, in_scale=s)
        out["transform_rel"] = float((y - y_ref).norm() / y_ref.norm())
        q = op(x, types, bits=4, clip=0.9, backend="triton")
        q_ref = aq.act_quant_eager(x, P_l, P_r, masks, types, bits=4, clip=0.9, in_scale=s)
        step = (q_ref.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)  # one 4-bit step per token
        flips = (q - q_ref).abs() / step
        out["fake_max_steps"] = float(flips.max())
        out["fake_differ"] = float((flips > 1e-3).float().mean())
        op_g = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning=dict(tuning, path="gemm"))
        out["gemm_equal"] = bool(torch.equal(op_g(x, types, bits=4, clip=0.9, backend="triton"), q_ref))
        codes, scales = op.int8(x, types, clip=0.9, bits=4, backend="triton")
        codes_ref, scales_ref = aq.act_quant_int8_eager(x, P_l, P_r, masks, types, 0.9, s, 1.0, 4)
        out["codes_max_diff"] = int((codes.int() - codes_ref.int()).abs().max())
        out["codes_differ"] = float((codes != codes_ref).float().mean())
        out["scales_rel"] = float(((scales - scales_ref).abs() / scales_ref).max())
        if case.get("BN") is None:  # single-pass tiles: the batched path, every mode
            op_b = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks,
                                   tuning={"path": "batched", "tokens_per_prog": case["tpp"]})
            yb = op_b(x, types, bits=16, backend="triton")
            out["batched_transform_rel"] = float((yb - y_ref).norm() / y_ref.norm())
            qb = op_b(x, types, bits=4, clip=0.9, backend="triton")
            out["batched_fake_max_steps"] = float(((qb - q_ref).abs() / step).max())
            cb, sb = op_b.int8(x, types, clip=0.9, bits=4, backend="triton")
            out["batched_codes_vs_kernel"] = int((cb.int() - codes.int()).abs().max())
            out["batched_scales_rel"] = float(((sb - scales).abs() / scales).max())
            op_p = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks,
                                   tuning={"path": "persistent", "programs_per_sm": 1, "stages": 2})
            yp = op_p(x, types, bits=16, backend="triton")
            out["persistent_transform_rel"] = float((yp - y_ref).norm() / y_ref.norm())
            qp = op_p(x, types, bits=4, clip=0.9, backend="triton")
            out["persistent_equals_kernel"] = bool(torch.equal(qp, q))
            cp, sp = op_p.int8(x, types, clip=0.9, bits=4, backend="triton")
            out["persistent_int8_equals_kernel"] = bool(torch.equal(cp, codes) and torch.equal(sp, scales))
        out["owner_form"] = aq.mask_owner(masks) is not None
        if case["masked"] == "owner":  # the masks built from the owner vector: the rows' numbers exactly
            for path in ("kernel", "persistent"):
                if case.get("BN") is not None and path == "persistent":
                    continue
                rows = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning=dict(tuning, path=path, mask="rows"))
                auto = aq.KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning=dict(tuning, path=path))
                same = [torch.equal(auto(x, types, bits=b, clip=0.9, backend="triton"),
                                    rows(x, types, bits=b, clip=0.9, backend="triton")) for b in (16, 4)]
                ca, sa = auto.int8(x, types, clip=0.9, bits=4, backend="triton")
                cr, sr = rows.int8(x, types, clip=0.9, bits=4, backend="triton")
                out[f"owner_equals_rows_{path}"] = bool(all(same) and torch.equal(ca, cr) and torch.equal(sa, sr))
        out["untouched"] = bool(torch.isfinite(q).all() and torch.isfinite(y).all())
    print("RESULT " + json.dumps(out))
""")


def _run(case: dict) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHECK, json.dumps(case)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", [
    dict(d_l=8, d_r=16, T=7, masked=True, tpp=1, seed=0),
    dict(d_l=8, d_r=16, T=7, masked=True, tpp=4, seed=1),  # 2 programs, the second with 3 live tokens
    dict(d_l=5, d_r=12, T=5, masked=False, tpp=2, seed=2),  # factors padded to 16 x 16
    dict(d_l=8, d_r=32, T=6, masked=True, tpp=4, seed=3, BN=16),  # two column blocks, two passes
    dict(d_l=8, d_r=16, T=9, masked="owner", tpp=2, seed=4),  # FreeAct-form masks: built from the owner vector
], ids=["one_token", "four_tokens", "padded", "two_pass", "owner_masks"])
def test_act_kernel_matches_eager_under_the_interpreter(case):
    r = _run(dict(case, kind="act"))
    assert r["untouched"]
    assert r["transform_rel"] < 1e-5
    # per-token fake quant and int codes: the same up to a rare one-level flip (summation order)
    assert r["fake_max_steps"] <= 1.0 + 1e-4 and r["fake_differ"] < 0.01
    assert r["gemm_equal"]  # the two-GEMM path (eager's transform, the row-quant kernel): eager bit for bit
    assert r["codes_max_diff"] <= 1 and r["codes_differ"] < 0.01
    assert r["scales_rel"] < 1e-5
    assert r["owner_form"] == (case["masked"] == "owner")  # random 0/1 rows are not of that form
    if case["masked"] == "owner":
        assert r["owner_equals_rows_kernel"] and r["owner_equals_rows_persistent"]
    if case.get("BN") is None:  # the batched path: the same math, tokens in blocks of tpp
        assert r["batched_transform_rel"] < 1e-5 and r["batched_fake_max_steps"] <= 1.0 + 1e-4
        assert r["batched_codes_vs_kernel"] <= 1 and r["batched_scales_rel"] < 1e-5
        # persistent programs (2 of them here, striding over the tokens): the token loop's very math
        assert r["persistent_transform_rel"] < 1e-5
        assert r["persistent_equals_kernel"] and r["persistent_int8_equals_kernel"]


def test_non_power_of_two_hadamard_kernel_under_the_interpreter():
    r = _run(dict(kind="hadamard", n=160, T=5, seed=4))  # 160 = 8 x 20: a Sylvester and a Paley factor
    assert r["rel"] < 1e-6


@pytest.mark.parametrize("block", [64, 16], ids=["one_block", "three_blocks"])
def test_row_quant_kernel_equals_the_eager_fake_quant_under_the_interpreter(block):
    """The per-token quantizer of linears without an online transform: float32, bit for bit eager's numbers,
    one block per row or (block 16 < 40) two passes over three blocks; an all-zero token stays zero."""
    r = _run(dict(kind="row", T=5, d=40, block=block, seed=5))
    assert r["equal"] and r["levels"] > 5
