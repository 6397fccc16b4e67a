"""Speed of the fast kernels (freeact.kernels) at 7-8B shapes on one GPU; rows go to results/perf.csv.

1. ``act``: the fused activation side (Kronecker transform -> FreeAct type mask -> per-token 4-bit fake
   quant, with the per-channel ``1/s``) against the same math in eager torch (the model's pipeline), for
   d = 4096 (64x64, LLaDA hidden), 3584 (56x64, Dream / Qwen2.5 hidden), 12288 (96x128, LLaDA FFN),
   14336 (112x128, LLaMA-3 FFN), 18944 (128x148, Dream FFN) and 2048-8192 tokens: median time of one call
   and of the kernel alone (replayed from a CUDA graph: the default, the other path (the fused kernel, or two
   GEMMs + the row-quant kernel: ``tuned_tiling``'s ``path``), and each alternative of the fused kernel's
   tokens per program, warps and, for two-pass tiles, column blocks; for tiles up to 64 x 64 the ``batched``
   path, blocks of 2-8 tokens per program; for single-pass tiles the ``persistent`` path, 2-8 programs per
   multiprocessor and 1-3 pipelining stages), speed-up, and the achieved bandwidth
   (one bf16 read + one bf16 write per element) as a share of the assumed peak.
2. ``fwht``: the Triton Walsh-Hadamard transform against ``fast_hadamard_transform`` (torch).
3. ``w8a8``: a prefill linear ``(tokens x K) @ (K x N)``: bf16 ``F.linear`` against W8A8 with the
   Kronecker transform fused into the activation quantizer (+ the int8 GEMM with its rescale
   epilogue, Triton), and the same with ``torch._int_mm`` + torch rescale; speed-up over bf16.

Timing: ``triton.testing.do_bench`` medians; inputs rotate over enough buffers to exceed the L2 cache
several times, so the numbers are HBM numbers. The assumed peak bandwidth (H200 4.8 TB/s, H100 3.35
TB/s by the datasheets) and a measured device-to-device copy ceiling are printed.

    PYTHONPATH=. python experiments/bench_kernels.py [--quick] [--out results/perf.csv]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from freeact.kernels import KronActQuant, act_quant_eager, fused_act_quant, hadamard_transform  # noqa: E402
from freeact.kernels.act_quant import MAX_BATCHED_TILE, kernel_tiling, tokens_per_program, tuned_tiling  # noqa: E402
from freeact.kernels.int8 import int8_matmul, quantize_rows_int8  # noqa: E402
from freeact.transforms.affine import most_square_factors, random_orthogonal  # noqa: E402
from freeact.transforms.hadamard import fast_hadamard_transform  # noqa: E402

PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, vendor datasheets
L2_BYTES = 60e6
FIELDS = ["timestamp", "bench", "device", "torch", "triton", "transformers", "commit", "command", "item", "model",
          "method", "shape", "tokens", "metric", "value", "unit", "note"]

ACT_WIDTHS = [4096, 3584, 12288, 14336, 18944]
LINEARS = [  # (K, N, what)
    (4096, 4096, "llada q/k/v/o"), (4096, 12288, "llada gate/up"), (12288, 4096, "llada down"),
    (3584, 3584, "dream q/o"), (3584, 18944, "dream gate/up"), (18944, 3584, "dream down"), (3584, 512, "dream k/v"),
]


# ----------------------------------------------------------------------------- shared with bench_cost.py
def env_info() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    try:
        import transformers
        hv = transformers.__version__
    except Exception:
        hv = "none"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    from freeact.experiment import git_commit

    return {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "device": dev, "torch": torch.__version__,
            "triton": tv, "transformers": hv, "commit": git_commit(),
            "command": " ".join(shlex.quote(a) for a in sys.argv)}


def peak_bandwidth(device_name: str) -> tuple[float | None, str]:
    for key, bw in PEAK_BW.items():
        if key in device_name:
            return bw, f"{key} datasheet {bw / 1e12:.2f} TB/s"
    return None, "unknown device: no assumed peak"


def append_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append long-format rows (one metric each) to the CSV, writing the header for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise SystemExit(f"{path} has other columns ({','.join(header)}) than this version writes: "
                             "write to a new file (--out)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` (CUDA events through triton.testing.do_bench when available)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def graph_ms(calls) -> float:
    """Median milliseconds per call of ``calls`` (a list of thunks, e.g. one per rotating input) replayed
    from one CUDA graph: the kernels' own time, without the Python and launch overhead between them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return bench_ms(graph.replay) / len(calls)


class Rotating:
    """Several copies of an input so that successive calls do not hit the L2 cache."""

    def __init__(self, make, bytes_each: int, min_total: float = 4 * L2_BYTES, max_copies: int = 16):
        n = max(2, min(max_copies, math.ceil(min_total / max(bytes_each, 1))))
        self.items = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


# ----------------------------------------------------------------------------- benches
def measure_copy_bw(dev) -> float:
    bufs = [torch.empty(int(1e9) // 2, dtype=torch.bfloat16, device=dev).normal_() for _ in range(2)]
    ms = bench_ms(lambda: bufs[1].copy_(bufs[0]))
    bw = 2 * bufs[0].numel() * 2 / (ms * 1e-3)  # bytes read + written
    bufs.clear()
    torch.cuda.empty_cache()
    return bw


def bench_act(tokens_list, widths, peak, base, rows, table):
    dev = "cuda"
    for d in widths:
        d_l, d_r = most_square_factors(d)
        P_l = random_orthogonal(d_l).float().to(dev)
        P_r = random_orthogonal(d_r).float().to(dev)
        s = (torch.rand(d, device=dev) + 0.5)
        masks = torch.ones(2, d, device=dev)
        r = max(1, d // 32)
        masks[0, d - r:] = 0
        masks[1, d - 2 * r:d - r] = 0
        for T in tokens_list:
            xs = Rotating(lambda: torch.randn(T, d, device=dev).bfloat16(), T * d * 2)
            types = torch.randint(0, 2, (T,), device=dev)
            op = KronActQuant(P_l, P_r, in_scale=s, masks=masks)  # operands converted once, as in a model
            k_ms = bench_ms(lambda: op(xs.next(), types, bits=4, clip=0.9, backend="triton"))
            # the kernel alone (replayed from a graph, as a captured forward runs it): the default launch, then
            # each tokens-per-program choice, warps, and (two-pass tiles) column blocks
            tile = kernel_tiling(d_l, d_r)
            default_path = tuned_tiling(d_l, d_r)["path"]
            other = "kernel" if default_path == "gemm" else "gemm"
            # the fused kernel's launch choices, and the path the default does not take
            choices = [("default", None), (f"path_{other}", {"path": other})]
            choices += [("mask_rows", {"mask": "rows"})]  # a mask row read per token instead of the owner vector
            choices += [(f"tpp{t}", {"tokens_per_prog": t, "path": "kernel"}) for t in (1, 2, 4, 8)]
            choices += [(f"warps{w}", {"num_warps": w, "path": "kernel"}) for w in (4, 8, 16)
                        if w != tile["num_warps"]]
            if tile["passes"] == 2:
                choices += [(f"BN{b}", {"BN": b, "path": "kernel"}) for b in (32, 64, 128)
                            if b != tile["BN"] and b < tile["DR"]]
            if tile["DL"] * tile["DR"] <= MAX_BATCHED_TILE:  # the block-of-tokens variant of the kernel
                choices += [(f"batched{t}w{w}", {"path": "batched", "tokens_per_prog": t, "num_warps": w})
                            for t in (2, 4, 8) for w in (4, 8)]
            if tile["passes"] == 1:  # persistent programs striding over the tokens, pipelined token loop
                choices += [(f"persistent{p}s{st}", {"path": "persistent", "programs_per_sm": p, "stages": st})
                            for p in (2, 4, 8) for st in (1, 2, 3)]
            per_choice = {}
            for name, tuning in choices:
                try:
                    op_t = KronActQuant(P_l, P_r, in_scale=s, masks=masks, tuning=tuning)
                    per_choice[name] = graph_ms([lambda x=x: op_t(x, types, bits=4, clip=0.9, backend="triton")
                                                 for x in xs.items])
                except Exception as e:  # e.g. out of shared memory or registers for this choice: keep the others
                    print(f"  d={d} T={T} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    per_choice[name] = float("nan")
            g_ms = per_choice["default"]
            tpp_default = tokens_per_program(T, torch.device(dev), tile["DL"] * tile["DR"])
            api_ms = bench_ms(lambda: fused_act_quant(xs.next(), P_l, P_r, masks, types, bits=4, clip=0.9,
                                                      backend="triton", in_scale=s))
            e_ms = bench_ms(lambda: act_quant_eager(xs.next(), P_l, P_r, masks, types, bits=4, clip=0.9, in_scale=s))
            nbytes = 2 * T * d * 2
            bw = nbytes / (g_ms * 1e-3)
            item = f"act d={d} ({d_l}x{d_r}) T={T}"
            common = dict(base, bench="kernels", item="fused_act_quant", shape=f"{d}={d_l}x{d_r}", tokens=T)
            rows += [dict(common, metric="kernel_ms", value=round(k_ms, 4), unit="ms",
                          note="KronActQuant (prepared), one eager call: kernel + Python + launch"),
                     dict(common, metric="kernel_graph_ms", value=round(g_ms, 4), unit="ms",
                          note=f"replayed from a CUDA graph, the default: path {default_path}"
                               + (f", {tpp_default} tokens per program" if default_path == "kernel" else "")),
                     *[dict(common, metric=f"kernel_graph_ms_{name}", value=round(v, 4), unit="ms")
                       for name, v in per_choice.items() if name != "default"],
                     dict(common, metric="api_call_ms", value=round(api_ms, 4), unit="ms",
                          note="fused_act_quant: converts the small operands every call"),
                     dict(common, metric="eager_ms", value=round(e_ms, 4), unit="ms"),
                     dict(common, metric="speedup_vs_eager", value=round(e_ms / k_ms, 2), unit="x"),
                     dict(common, metric="bandwidth", value=round(bw / 1e12, 3), unit="TB/s",
                          note="one bf16 read + one bf16 write per element over kernel_graph_ms")]
            if peak:
                rows.append(dict(common, metric="pct_peak_bw", value=round(100 * bw / peak, 1), unit="%"))
            table.append((item, g_ms, e_ms, bw, peak))
            alts = ", ".join(f"{n} {v * 1e3:.1f} us" for n, v in per_choice.items() if n != "default")
            print(f"{item}: kernel {g_ms:.3f} ms in a graph ({k_ms:.3f} ms called), eager {e_ms:.3f} ms, "
                  f"{bw / 1e12:.2f} TB/s; launch choices: {alts}", flush=True)


def bench_fwht(tokens_list, sizes, peak, base, rows, table):
    dev = "cuda"
    for n in sizes:
        for T in tokens_list:
            xs = Rotating(lambda: torch.randn(T, n, device=dev).bfloat16(), T * n * 2)
            k_ms = bench_ms(lambda: hadamard_transform(xs.next(), backend="triton"))
            e_ms = bench_ms(lambda: fast_hadamard_transform(xs.next(), backend="torch"))
            bw = 2 * T * n * 2 / (k_ms * 1e-3)
            common = dict(base, bench="kernels", item="fwht", shape=str(n), tokens=T)
            rows += [dict(common, metric="kernel_ms", value=round(k_ms, 4), unit="ms"),
                     dict(common, metric="eager_ms", value=round(e_ms, 4), unit="ms"),
                     dict(common, metric="speedup_vs_eager", value=round(e_ms / k_ms, 2), unit="x"),
                     dict(common, metric="bandwidth", value=round(bw / 1e12, 3), unit="TB/s")]
            if peak:
                rows.append(dict(common, metric="pct_peak_bw", value=round(100 * bw / peak, 1), unit="%"))
            table.append((f"fwht n={n} T={T}", k_ms, e_ms, bw, peak))
            print(f"fwht n={n} T={T}: kernel {k_ms:.3f} ms, eager {e_ms:.3f} ms, {bw / 1e12:.2f} TB/s", flush=True)


def bench_w8a8(tokens_list, linears, base, rows, table):
    dev = "cuda"
    for K, N, what in linears:
        d_l, d_r = most_square_factors(K)
        P_l, P_r = random_orthogonal(d_l).float().to(dev), random_orthogonal(d_r).float().to(dev)
        s = torch.rand(K, device=dev) + 0.5
        W = (torch.randn(N, K, device=dev) / math.sqrt(K)).bfloat16()
        qw, sw = quantize_rows_int8(W)
        op = KronActQuant(P_l, P_r, in_scale=s)
        for T in tokens_list:
            xs = Rotating(lambda: torch.randn(T, K, device=dev).bfloat16(), T * K * 2, max_copies=8)

            def w8a8(mm):
                q, sx = op.int8(xs.next(), backend="triton")
                return int8_matmul(q, sx, qw, sw, None, torch.bfloat16, backend=mm)

            def w8a8_plain():
                q, sx = quantize_rows_int8(xs.next())
                return int8_matmul(q, sx, qw, sw, None, torch.bfloat16, backend="triton")

            t_bf16 = bench_ms(lambda: F.linear(xs.next(), W))
            t_tri = bench_ms(lambda: w8a8("triton"))
            t_torch = bench_ms(lambda: w8a8("torch"))
            t_act = bench_ms(lambda: op.int8(xs.next(), backend="triton"))
            xq, sq = op.int8(xs.next(), backend="triton")
            t_gemm = bench_ms(lambda: int8_matmul(xq, sq, qw, sw, None, torch.bfloat16, backend="triton"))
            t_plain = bench_ms(w8a8_plain)
            flops = 2 * T * K * N
            common = dict(base, bench="kernels", item=f"w8a8 {what}", shape=f"{K}x{N}", tokens=T)
            rows += [dict(common, metric="bf16_ms", value=round(t_bf16, 4), unit="ms"),
                     dict(common, metric="w8a8_fused_transform_ms", value=round(t_tri, 4), unit="ms",
                          note="kron transform+int8 quant kernel + triton int8 GEMM with rescale epilogue"),
                     dict(common, metric="w8a8_intmm_ms", value=round(t_torch, 4), unit="ms",
                          note="same quant kernel + torch._int_mm + torch rescale"),
                     dict(common, metric="int8_gemm_only_ms", value=round(t_gemm, 4), unit="ms"),
                     dict(common, metric="act_transform_int8_quant_ms", value=round(t_act, 4), unit="ms"),
                     dict(common, metric="w8a8_no_transform_eager_quant_ms", value=round(t_plain, 4), unit="ms"),
                     dict(common, metric="speedup_vs_bf16", value=round(t_bf16 / t_tri, 3), unit="x"),
                     dict(common, metric="bf16_tflops", value=round(flops / t_bf16 / 1e9, 1), unit="TFLOP/s"),
                     dict(common, metric="int8_gemm_tops", value=round(flops / t_gemm / 1e9, 1), unit="TOP/s")]
            table.append((f"w8a8 {K}x{N} T={T} ({what})", t_bf16, t_tri, t_torch, t_gemm, t_act))
            print(f"w8a8 {K}x{N} T={T}: bf16 {t_bf16:.3f} ms, w8a8+transform {t_tri:.3f} ms (int_mm {t_torch:.3f}), "
                  f"gemm {t_gemm:.3f} ms -> {t_bf16 / t_tri:.2f}x", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes at 2048 tokens (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "results" / "perf.csv"))
    ap.add_argument("--tokens", default="2048,8192")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: act,fwht,w8a8")
    ap.add_argument("--widths", default=None, help="act: comma list of widths (default: " +
                    ",".join(map(str, ACT_WIDTHS)) + "; --quick: 4096,18944)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU (the eager paths are what runs on CPU)")
    torch.manual_seed(0)
    base = env_info()
    peak, peak_note = peak_bandwidth(base["device"])
    tokens = [2048] if args.quick else [int(t) for t in args.tokens.split(",")]
    widths = [4096, 18944] if args.quick else ACT_WIDTHS
    if args.widths:
        widths = [int(w) for w in args.widths.split(",")]
    fwht = [4096] if args.quick else [4096, 8192, 16384]
    linears = LINEARS[:1] + LINEARS[5:6] if args.quick else LINEARS
    skip = set(filter(None, args.skip.split(",")))
    print(f"device: {base['device']} | torch {base['torch']} | triton {base['triton']} | assumed peak: {peak_note}")
    copy_bw = measure_copy_bw("cuda")
    print(f"measured device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = [dict(base, bench="kernels", item="copy", metric="d2d_copy_bandwidth", value=round(copy_bw / 1e12, 3),
                 unit="TB/s", note=peak_note)]
    act_t, fwht_t, mm_t = [], [], []
    t0 = time.time()
    sections = [("act", lambda: bench_act(tokens, widths, peak, base, rows, act_t)),
                ("fwht", lambda: bench_fwht(tokens, fwht, peak, base, rows, fwht_t)),
                ("w8a8", lambda: bench_w8a8(tokens, linears, base, rows, mm_t))]
    written = 0
    for name, run in sections:
        if name in skip:
            continue
        try:
            run()
        except Exception as e:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            print(f"section {name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        append_rows(args.out, rows[written:])  # section by section: a time limit keeps what was measured
        written = len(rows)
    print(f"\n{len(rows)} rows appended to {args.out} ({time.time() - t0:.0f} s)\n")
    pk = f"% of {peak / 1e12:.2f} TB/s" if peak else "% peak (n/a)"
    if act_t or fwht_t:
        print(f"| kernel | Triton ms (act: from a graph) | eager ms | speed-up | TB/s | {pk} |\n"
              "|---|---|---|---|---|---|")
        for item, k, e, bw, p in act_t + fwht_t:
            pct = f"{100 * bw / p:.0f}" if p else "-"
            print(f"| {item} | {k:.3f} | {e:.3f} | {e / k:.1f}x | {bw / 1e12:.2f} | {pct} |")
    if mm_t:
        print("\n| linear (prefill) | bf16 ms | W8A8+fused transform ms | with torch._int_mm ms | int8 GEMM only ms "
              "| transform+int8 quant ms | speed-up vs bf16 |\n|---|---|---|---|---|---|---|")
        for item, b, t, tm, g, a in mm_t:
            print(f"| {item} | {b:.3f} | {t:.3f} | {tm:.3f} | {g:.3f} | {a:.3f} | {b / t:.2f}x |")


if __name__ == "__main__":
    main()
