"""Calibration cost of every method on 7-8B configurations, on one GPU; rows go to results/perf.csv.

Models (random weights from the hand-written configs below; no hub access):

* ``llada_8b``: LLaDA-8B (d 4096, 32 layers, 32 heads, FFN 12288, vocab 126464, bidirectional, mask 126336);
* ``dream_7b``: Dream-7B = Qwen2.5-7B layout (d 3584, 28 layers, 28 heads / 4 KV, FFN 18944, vocab 152064,
  qkv biases, bidirectional, mask 151666);
* ``qwen2_5_vl_7b``: Qwen2.5-VL-7B's language model (same dims as Dream, causal; FreeAct's token types
  are image placeholder (151655) vs text; a quarter of every calibration sequence is image tokens).

Methods with their published settings: ``rtn``; ``gptq``; ``quarot`` (random Hadamard, GPTQ weights with
MSE clip, act clip 0.9); ``flatquant`` and ``freeact`` (block-wise training, 15 epochs, batch 4);
W4A4, 128 calibration sequences x 2048 tokens by default.

**What is timed.** A 10-minute job cannot calibrate all layers of a learned method, so the model is
built with ``--layers k`` decoder layers (plus the real embeddings and LM head) and calibrated
entirely; :class:`~freeact.methods.streaming.LayerTimeline` splits the wall time into the part before
the first layer starts (capture, fusions, rotations) and one segment per layer (the mean segment is
the measured per-layer time; the first is excluded when ``k >= 2``; the last includes the final weight
quantization pass), and the trainer's own per-layer training time (``train_layer_seconds``, CUDA-graph replays
included) over its steps gives the time of a step. The full-model figure,
labelled ``extrapolated``, is ``prefix + num_layers x per_layer`` where, for the learned methods, the
per-layer time is the measured non-training part plus ``ceil(128 / 4) x 15 = 480`` steps at the
measured mean step time (so ``--epochs 1`` already gives the published-settings estimate); with
fewer than ``--target-nsamples`` sequences, the parts linear in the data are scaled up (an upper bound).
Peak GPU memory is ``torch.cuda.max_memory_allocated`` during calibration; the extrapolated peak adds
the other layers' weights when not streaming and the larger calibration cache when fewer sequences
were used. With streaming (``--streaming auto``: GPTQ, FlatQuant, FreeAct) the model stays on the CPU
and one layer at a time is on the GPU (:mod:`freeact.methods.streaming`); the peak does not grow with
depth. The float32 matmul precision in force (TF32 or not, including the
``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` variable some images set) is recorded in every row.

**Evaluation overhead.** One forward of ``--eval-tokens`` tokens of the fake-quant model (online
transforms + activation quantizers, eager), and after :func:`~freeact.kernels.fuse_input_quantizers` (the
fused Triton kernel), each timed in alternation with a fresh bf16 model of the same config built after the
calibration (``--eval-rounds`` rounds; the ratio is the median of the rounds' ratios), so that the host's
drift and the state the calibration left the process in fall on both alike. ``eval_bf16_ms`` is the bf16
forward before calibration, for comparison. CUDA events around every decoder layer separate the layers from
the rest (embeddings, LM head), so the full-depth ratio ``(rest + L x layer_q) / (rest + L x layer_bf16)``
is extrapolated too. On a GPU both forwards are also replayed from CUDA graphs
(:class:`~freeact.eval.cuda_graphs.GraphedForward`, ``--cuda-graph``): the device's time without the host's
launch cost, which a forward of many small kernels can exceed. Every evaluation row's note gives the host's
own time until the forward returns, against which the wall time shows whether the host or the device set it.

Targets printed at the end: FreeAct and FlatQuant on an 8B model <= 30 min and <= 40 GB peak; fake-quant evaluation
<= 1.5x the bf16 forward.

    PYTHONPATH=. python experiments/bench_cost.py [--quick] [--models llada_8b,dream_7b,qwen2_5_vl_7b]
        [--methods freeact,flatquant,quarot,gptq,rtn] [--layers 1] [--nsamples 128] [--seqlen 2048]
        [--epochs 15] [--tf32 off] [--budget-s 300] [--profile-eval 15] [--out results/perf.csv]
    (CPU dry run of the script only: --device cpu --tiny --nsamples 8 --seqlen 32 --eval-tokens 32)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_kernels import append_rows, env_info  # noqa: E402

from freeact.data.calib import CalibSet  # noqa: E402
from freeact.data.text import mask_tokens  # noqa: E402
from freeact.eval.cuda_graphs import GraphedForward  # noqa: E402
from freeact.kernels import fuse_input_quantizers  # noqa: E402
from freeact.methods import QuantContext, QuantSettings, get_method, method_names  # noqa: E402
from freeact.methods.streaming import LayerTimeline  # noqa: E402
from freeact.models import get_adapter  # noqa: E402
from freeact.models.dllm import DreamConfig, DreamModelLM, LLaDAConfig, LLaDAModelLM  # noqa: E402
from freeact.quant.quantizer import QuantSpec  # noqa: E402

GB = 2**30
IMAGE_TOKEN = 151655  # Qwen2.5-VL <|image_pad|>

MODELS = {
    "llada_8b": dict(family="llada", layers=32, cfg=dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=126464, max_position_embeddings=4096, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, mask_token_id=126336, bos_token_id=126080,
        eos_token_id=126081, pad_token_id=126081)),
    "dream_7b": dict(family="dream", layers=28, cfg=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, mask_token_id=151666, bos_token_id=151643,
        eos_token_id=151643, pad_token_id=151643)),
    "qwen2_5_vl_7b": dict(family="causal_qwen2", layers=28, cfg=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643)),
}
METHODS = {  # published settings; epochs filled from --epochs
    "rtn": {},
    "gptq": {},
    "quarot": {},
    "flatquant": {"epochs": 15},
    "freeact": {"epochs": 15},
}
LEARNED = ("flatquant", "freeact")
STREAM_AUTO = ("gptq", "flatquant", "freeact")
TARGETS = {"freeact_minutes": 30.0, "freeact_peak_gb": 40.0, "eval_overhead": 1.5}


# ----------------------------------------------------------------------------- models and data
TINY = dict(hidden_size=256, intermediate_size=592, num_attention_heads=4, num_key_value_heads=2)


def build_model(name: str, layers: int, device: str = "cuda", seed: int = 0, tiny: bool = False):
    """The model of ``name`` with ``layers`` decoder layers, random weights, bf16, built on ``device``
    (``tiny``: small widths, same vocabulary and token ids, for a CPU dry run of this script)."""
    spec = MODELS[name]
    cfg = dict(spec["cfg"], num_hidden_layers=layers, **(TINY if tiny else {}))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # init directly in bf16 on the GPU: seconds, not minutes
    try:
        with torch.device(device):
            if spec["family"] == "llada":
                model = LLaDAModelLM(LLaDAConfig(**cfg))
            elif spec["family"] == "dream":
                model = DreamModelLM(DreamConfig(**cfg))
            else:
                from transformers import Qwen2Config, Qwen2ForCausalLM

                model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    finally:
        torch.set_default_dtype(prev)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"random init left non-finite parameters: {bad[:3]}")
    return model.to(torch.bfloat16).eval()


def calib_set(name: str, model, nsamples: int, seqlen: int, seed: int = 0) -> CalibSet:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    clean = torch.randint(0, min(vocab, 120000), (nsamples, seqlen), generator=g)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is not None:  # dLLM: per-sequence masking ratio t ~ U(0, 1)
        masked, _ = mask_tokens(clean, mask_id, g, 0.0, 1.0)
        return CalibSet(masked, clean)
    ids = clean.clone()
    span = seqlen // 4  # a VLM prompt: one image's placeholder tokens, then text
    starts = torch.randint(0, seqlen - span + 1, (nsamples,), generator=g)
    for i, s in enumerate(starts.tolist()):
        ids[i, s:s + span] = IMAGE_TOKEN
    return CalibSet(ids, ids)


def w4a4() -> QuantSettings:
    """The settings every measurement here quantizes to: 4-bit weights and activations, 16-bit KV cache."""
    return QuantSettings(QuantSpec(bits=4), QuantSpec(bits=4), QuantSpec(bits=16, symmetric=False))


def method_cfg(method: str, model_name: str, epochs: int, amp: str = "off", compile_: str = "default") -> dict:
    cfg = dict(METHODS[method])
    if method in LEARNED:
        cfg["epochs"] = epochs
        cfg["amp"] = amp
        if compile_ != "default":  # else the method's own default
            cfg["compile"] = {"auto": "auto", "on": True, "off": False}[compile_]
    if method == "freeact" and MODELS[model_name]["family"] == "causal_qwen2":
        cfg["token_types"] = [{"name": "image", "ids": [IMAGE_TOKEN]}, "text"]
    return cfg


# ----------------------------------------------------------------------------- forward timing
class ForwardProbe:
    """Stamps (CUDA events; wall clock on CPU) around every decoder layer: ``(total_ms, layers_ms, note)``
    of one forward, medians over ``repeats`` after two warm-up forwards. ``note`` says of the timed forwards
    what a host-bound forward shows: the host's own time until ``model(...)`` returns (median), and how many
    garbage collections and device allocations / frees ran meanwhile (a device allocation can make the host
    wait for the GPU)."""

    def __init__(self, adapter, device: str):
        self.layers = list(adapter.layers())
        self.cuda = device.startswith("cuda")

    def _alloc_counts(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        st = torch.cuda.memory_stats()
        return st.get("num_device_alloc", 0), st.get("num_device_free", 0)

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)

    @torch.no_grad()
    def time(self, model, ids: torch.Tensor, repeats: int = 5) -> tuple[float, float, str]:
        stamps, hs = [], []
        for l in self.layers:
            hs.append(l.register_forward_pre_hook(lambda *a: stamps.append(self._stamp())))
            hs.append(l.register_forward_hook(lambda *a: stamps.append(self._stamp())))
        try:
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
            totals, layer_sums, hosts = [], [], []
            gc0, (al0, fr0) = sum(g["collections"] for g in gc.get_stats()), self._alloc_counts()
            for _ in range(repeats):
                stamps.clear()
                a = self._stamp()
                h0 = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                hosts.append(1e3 * (time.perf_counter() - h0))
                b = self._stamp()
                if self.cuda:
                    torch.cuda.synchronize()
                totals.append(self._ms(a, b))
                layer_sums.append(sum(self._ms(stamps[i], stamps[i + 1]) for i in range(0, len(stamps) - 1, 2)))
            al1, fr1 = self._alloc_counts()
            note = (f"host {statistics.median(hosts):.3f} ms until return; "
                    f"{sum(g['collections'] for g in gc.get_stats()) - gc0} gc runs, {al1 - al0} device allocs, "
                    f"{fr1 - fr0} frees in {repeats} timed forwards")
        finally:
            for h in hs:
                h.remove()
        return statistics.median(totals), statistics.median(layer_sums), note


def paired_times(probe_q: ForwardProbe, model_q, probe_b: ForwardProbe, model_b, ids: torch.Tensor,
                 rounds: int = 5, repeats: int = 3) -> tuple[list, list]:
    """``rounds`` rounds of :meth:`ForwardProbe.time` on two models in alternation (q, b, q, b, ...): the
    ``(total_ms, layers_ms, note)`` of each round, per model. A host-bound forward is timed at the host's
    speed of the moment, which drifts (the host time of the same operators differed 2x between bf16 forwards
    minutes apart, results/perf_logs at 5e11741); in alternation the drift falls on both models alike, and a
    ratio taken per round cancels it."""
    got_q, got_b = [], []
    for _ in range(rounds):
        got_q.append(probe_q.time(model_q, ids, repeats))
        got_b.append(probe_b.time(model_b, ids, repeats))
    return got_q, got_b


def paired_ratio(got_q: list, got_b: list, k: int, L: int) -> float:
    """The median over rounds of each round's full-depth ratio (:func:`extrapolated_ratio`)."""
    return statistics.median(extrapolated_ratio(q[0], q[1], b[0], b[1], k, L) for q, b in zip(got_q, got_b))


def medians(got: list) -> tuple[float, float, str]:
    """``(total_ms, layers_ms, note)``: the medians over the rounds, and the middle round's note."""
    return (statistics.median(g[0] for g in got), statistics.median(g[1] for g in got), got[len(got) // 2][2])


def time_graphed(model, ids: torch.Tensor, repeats: int = 5) -> float:
    """Milliseconds of one forward replayed from a CUDA graph (:class:`GraphedForward`; median of ``repeats``
    after the capture and one replay): the GPU's time, without the host's launch cost. The graphs are
    freed afterwards."""
    gf = GraphedForward(model)
    try:
        gf(ids)
        gf(ids)
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            gf(ids)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    finally:
        gf.release()
        gc.collect()
        torch.cuda.empty_cache()


def graphed_or_nan(model, ids: torch.Tensor, what: str) -> float:
    """:func:`time_graphed`, or NaN with a line that says why when the forward cannot be captured."""
    try:
        return time_graphed(model, ids)
    except Exception as e:  # report, keep the other numbers
        print(f"{what}: CUDA-graph evaluation failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")


@torch.no_grad()
def profile_forward(model, ids: torch.Tensor, device: str, top: int) -> str:
    """The ``top`` operators of one forward by device time and by host time (self times; CPU time only on a
    CPU), after one warm-up forward, and on a GPU the host synchronisations one forward makes: where an
    evaluation overhead comes from (a forward whose host time exceeds its device time leaves the GPU idle)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    model(input_ids=ids, use_cache=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        model(input_ids=ids, use_cache=False)
        _sync(device)
    ev = prof.key_averages()
    kernels = sum(e.count for e in prof.events() if e.device_type.name == "CUDA")
    head = f"{kernels} device kernels in one forward"
    tables = []
    if cuda:
        head += f"; {host_syncs(model, ids)} host synchronisations (torch.cuda sync debug mode)"
        tables.append("by device time\n" + ev.table(sort_by="self_cuda_time_total", row_limit=top,
                                                      max_name_column_width=70))
    tables.append("by host time\n" + ev.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70))
    tables.append(python_profile(model, ids, device, top))
    return head + "\n" + "\n".join(tables)


@torch.no_grad()
def python_profile(model, ids: torch.Tensor, device: str, top: int) -> str:
    """The ``top`` Python functions of one forward by their own time (``cProfile``): the host time that the
    operator profile does not see (a Triton launch is Python until its driver call), where a forward that
    leaves the GPU idle spends it (its host time against its wall time: the evaluation rows' notes)."""
    import cProfile
    import io
    import pstats

    _sync(device)
    pr = cProfile.Profile()
    pr.enable()
    model(input_ids=ids, use_cache=False)
    pr.disable()
    _sync(device)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    body = buf.getvalue().split("\n")
    start = next((i for i, line in enumerate(body) if line.lstrip().startswith("ncalls")), 0)
    return "Python, by own time (cProfile), one forward\n" + "\n".join(body[start:]).rstrip()


@torch.no_grad()
def host_syncs(model, ids: torch.Tensor) -> int:
    """How many times one forward makes the host wait for the GPU (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def calib_profiler(top: int, cuda: bool):
    """``torch.profiler`` over the whole calibration when ``top`` > 0 (else nothing): which kernels a
    training step spends its time in (kernels replayed from a CUDA graph are traced too). The timings of a
    profiled run are not recorded."""
    if not top:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        yield prof


def phase_summary(prof) -> str:
    """Host and device milliseconds of the block trainer's named phases (cast, full-precision pass, build,
    steps, merge) and of the streamer's layer transfers."""
    lines = ["phase | calls | host ms | device ms"]
    for e in prof.key_averages():
        if e.key.startswith(("block_training.", "streaming.")):
            dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
            lines.append(f"{e.key} | {e.count} | {e.cpu_time_total / 1e3:.1f} | {dev / 1e3:.1f}")
    return "\n".join(lines)


def extrapolated_ratio(t_q, l_q, t_b, l_b, k: int, L: int) -> float:
    rest = max(t_b - l_b, 0.0)
    return (rest + L * l_q / k) / (rest + L * l_b / k)


def step_seconds(info: dict) -> tuple[int, float]:
    """``(steps, seconds per step)`` of a learned method's block training, from its own per-layer timing
    (``train_layer_seconds``: first step to the layer's last, CUDA-graph replays included; a timer in an
    optimizer hook would see only the eager steps, and one that synchronises breaks the graph capture)."""
    steps = int(info.get("train_steps", 0) or 0)
    secs = [float(v) for v in str(info.get("train_layer_seconds", "")).split("|") if v]
    return steps, (sum(secs) / steps if steps and secs else 0.0)


def extrapolate(method: str, args, prefix: float, per_layer: float, steps: int, step_s: float, k: int,
                L: int) -> tuple[float, float, str]:
    """Seconds for the whole model at the published settings: ``(per_layer, total, label)``.

    Learned methods: per layer, the measured non-training time (scaled with the number of sequences:
    the full-precision pass is linear in it, an upper bound for the rest) plus the published number of
    steps (``ceil(target / 4) x 15``) at the measured step time. Others: the measured layer time, scaled
    with the number of sequences when fewer were used (an upper bound)."""
    n_scale = args.target_nsamples / args.nsamples
    parts = [f"layers {k}->{L}"]
    if n_scale != 1:
        parts.append(f"sequences {args.nsamples}->{args.target_nsamples}")
    if method in LEARNED and steps:
        steps_layer = steps / k
        rest = max(per_layer - steps_layer * step_s, 0.0)
        steps_full = math.ceil(args.target_nsamples / 4) * 15
        full_layer = rest * n_scale + steps_full * step_s
        if round(steps_layer) != steps_full:
            parts.append(f"steps {steps_layer:.0f}->{steps_full} at {step_s:.3f} s/step")
    else:
        full_layer = per_layer * n_scale
    return full_layer, prefix * n_scale + L * full_layer, "extrapolated (" + ", ".join(parts) + ")"


def cache_bytes_per_sequence(method: str, seqlen: int, d: int) -> int:
    """Calibration cache per sequence: bf16 capture (+ float32 inputs and targets for block training,
    + bf16 outputs for GPTQ)."""
    if method in LEARNED:
        return seqlen * d * (2 + 4 + 4)
    return seqlen * d * (2 + 2) if method in ("gptq", "quarot") else 0


# ----------------------------------------------------------------------------- one measurement
def layer_bytes(adapter) -> int:
    layer = adapter.layers()[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def run_one(model_name: str, method: str, args, base: dict) -> tuple[list[dict], dict]:
    k, L, dev = args.layers, MODELS[model_name]["layers"], args.device
    cuda = dev.startswith("cuda")
    t_build = time.perf_counter()
    model = build_model(model_name, k, dev, tiny=args.tiny)
    adapter = get_adapter(model)
    _sync(dev)
    t_build = time.perf_counter() - t_build
    calib = calib_set(model_name, model, args.nsamples, args.seqlen, seed=0)
    eval_ids = calib.input_ids[:1, : args.eval_tokens].to(dev)
    probe = ForwardProbe(adapter, dev)
    t_b, l_b, diag_b = probe.time(model, eval_ids)
    graphs = cuda and args.cuda_graph == "on"
    t_bg = graphed_or_nan(model, eval_ids, f"{model_name}/bf16") if graphs else float("nan")
    profiles = [f"## {model_name} bf16 forward, 1x{eval_ids.shape[1]} tokens, {k} layer(s)\n"
                + profile_forward(model, eval_ids, dev, args.profile_eval)] if args.profile_eval else []
    lbytes = layer_bytes(adapter)
    streaming = method in STREAM_AUTO if args.streaming == "auto" else args.streaming == "on"
    if streaming:
        model.to("cpu")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    q = w4a4()
    ctx = QuantContext(model, adapter, q, calib, device=dev, batch_size=4, seed=0, progress=args.progress,
                       streaming=streaming, stream_cache="device")
    cfg = method_cfg(method, model_name, args.epochs, args.amp, args.compile)
    with LayerTimeline(adapter) as tl, calib_profiler(args.profile_calib, cuda) as prof:
        info = get_method(method, cfg).apply(ctx)
        tl.stop()
    wall = tl.t_end - tl.t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    segs = tl.segments()
    per_layer = statistics.mean(segs[1:] if len(segs) >= 2 else segs) if segs else 0.0
    steps, step_s = step_seconds(info)
    full_layer, total_x, label = extrapolate(method, args, tl.prefix(), per_layer, steps, step_s, k, L)
    extra_cache = (args.target_nsamples - args.nsamples) * cache_bytes_per_sequence(
        method, args.seqlen, model.config.hidden_size)
    peak_x = peak + max(extra_cache, 0) + (0 if streaming else (L - k) * lbytes)
    if streaming:
        model.to(dev)
    # the reference: a fresh bf16 model, timed in alternation with the quantized one (paired_times): a slower
    # process shows in both, and the host's drift cancels in the per-round ratios
    ref = build_model(model_name, k, dev, tiny=args.tiny)
    rprobe = ForwardProbe(get_adapter(ref), dev)
    got_q, got_r = paired_times(probe, model, rprobe, ref, eval_ids, args.eval_rounds)
    (t_q, l_q, diag_q), (t_r, l_r, diag_r) = medians(got_q), medians(got_r)
    ratio_x = paired_ratio(got_q, got_r, k, L)
    t_fg, ratio_fx = float("nan"), float("nan")
    try:
        n_fused = fuse_input_quantizers(model)
        t_f, l_f, diag_f = float("nan"), float("nan"), ""
        if n_fused:
            got_f, got_r2 = paired_times(probe, model, rprobe, ref, eval_ids, args.eval_rounds)
            (t_f, l_f, diag_f), ratio_fx = medians(got_f), paired_ratio(got_f, got_r2, k, L)
        t_fg = graphed_or_nan(model, eval_ids, f"{model_name}/{method}") if graphs else float("nan")
        if args.profile_eval:
            profiles.append(f"## {model_name} {method} fake-quant forward ({n_fused} fused input quantizers)\n"
                            + profile_forward(model, eval_ids, dev, args.profile_eval))
    except Exception as e:  # report and keep the calibration numbers
        print(f"{model_name}/{method}: fused evaluation failed: {type(e).__name__}: {e}")
        n_fused, t_f, l_f, diag_f, t_fg, ratio_fx = 0, float("nan"), float("nan"), "", float("nan"), float("nan")
    del ref, rprobe
    if prof is not None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        out = Path(args.profile_dir) / f"calib_profile_{model_name}_{method}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        table = phase_summary(prof) + "\n\n" + prof.key_averages().table(
            sort_by=sort, row_limit=args.profile_calib, max_name_column_width=70)
        out.write_text(f"{base['device']} | torch {base['torch']} | {' '.join(sys.argv[1:])}\n"
                       f"{steps} training steps, {step_s:.4f} s a step (profiled: slower than unprofiled); "
                       f"CUDA graph: {info.get('cuda_graph', '-')}\n\n{table}\n")
        print(table + f"\n(written to {out})", flush=True)
    if profiles:
        out = Path(args.profile_dir) / f"eval_profile_{model_name}_{method}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"{base['device']} | torch {base['torch']} | {' '.join(sys.argv[1:])}\n\n"
                       + "\n\n".join(profiles) + "\n")
        print("\n\n".join(profiles) + f"\n(written to {out})", flush=True)
    # graphed: no per-layer stamps inside a graph; the layers' time is the total less the eager bf16 forward's
    # time outside the layers (embedding, final norm, head: the same kernels, GPU-bound)
    rest = max(t_b - l_b, 0.0)
    ratio_gx = extrapolated_ratio(t_fg, t_fg - rest, t_bg, t_bg - rest, k, L)
    common = dict(base, bench="cost", model=model_name, method=method, tokens=args.nsamples * args.seqlen,
                  shape=f"{args.nsamples}x{args.seqlen}, layers timed {k}/{L}")
    note = (f"streaming={streaming} {args.tf32_state} amp={cfg.get('amp', '-')} "
            f"compile={cfg.get('compile', 'method default')} epochs={cfg.get('epochs', '-')} batch=4")
    rows = [dict(common, metric="calib_wall_s_measured", value=round(wall, 2), unit="s", note=note),
            dict(common, metric="calib_prefix_s", value=round(tl.prefix(), 2), unit="s",
                 note="before the first layer: capture, fusions, rotations"),
            dict(common, metric="calib_per_layer_s_measured", value=round(per_layer, 2), unit="s",
                 note="segments " + "|".join(f"{s:.2f}" for s in segs) + f"; {steps} optimizer steps"),
            dict(common, metric="calib_step_s", value=round(step_s, 4), unit="s",
                 note=f"mean over the training, learned methods; CUDA graph: {info.get('cuda_graph', '-')}"),
            dict(common, metric="calib_per_layer_s", value=round(full_layer, 2), unit="s", note=label),
            dict(common, metric="calib_total_s", value=round(total_x, 1), unit="s", note=label),
            dict(common, metric="peak_gpu_gb_measured", value=round(peak / GB, 2), unit="GiB", note=note),
            dict(common, metric="peak_gpu_gb", value=round(peak_x / GB, 2), unit="GiB",
                 note=("streaming: independent of depth" if streaming else "+ the other layers' weights")
                 + (f"; + cache for {args.target_nsamples} sequences" if extra_cache > 0 else "")),
            dict(common, metric="model_build_s", value=round(t_build, 2), unit="s"),
            dict(common, metric="eval_bf16_ms", value=round(t_b, 3), unit="ms",
                 note=f"1x{eval_ids.shape[1]} tokens; layers {l_b:.3f} ms; {diag_b}"),
            dict(common, metric="eval_bf16_after_ms", value=round(t_r, 3), unit="ms",
                 note=f"a fresh bf16 model after the calibration, timed in alternation with the fake-quant one "
                      f"(the reference of the overheads); layers {l_r:.3f} ms; {diag_r}"),
            dict(common, metric="eval_fakequant_ms", value=round(t_q, 3), unit="ms",
                 note=f"layers {l_q:.3f} ms; {diag_q}"),
            dict(common, metric="eval_overhead_layer", value=round(l_q / l_r, 3), unit="x",
                 note="eager; vs the paired bf16 reference"),
            dict(common, metric="eval_overhead", value=round(ratio_x, 3), unit="x",
                 note=f"eager; median over {args.eval_rounds} rounds in alternation with bf16; {label}")]
    if n_fused:
        rows += [dict(common, metric="eval_fused_ms", value=round(t_f, 3), unit="ms",
                      note=f"{n_fused} fused input quantizers; layers {l_f:.3f} ms; {diag_f}"),
                 dict(common, metric="eval_overhead_fused", value=round(ratio_fx, 3), unit="x",
                      note=f"fused kernel; median over {args.eval_rounds} rounds in alternation with bf16; {label}")]
    if not math.isnan(ratio_gx):
        gnote = f"CUDA graphs, bf16 and fused fake quant alike; layers = total - {rest:.3f} ms outside them"
        rows += [dict(common, metric="eval_graph_bf16_ms", value=round(t_bg, 3), unit="ms", note=gnote),
                 dict(common, metric="eval_graph_fused_ms", value=round(t_fg, 3), unit="ms", note=gnote),
                 dict(common, metric="eval_overhead_graph", value=round(ratio_gx, 3), unit="x",
                      note=f"{gnote}; {label}")]
    summary = dict(model=model_name, method=method, streaming=streaming, k=k, L=L, per_layer=full_layer,
                   total=total_x, wall=wall, peak=peak / GB, peak_x=peak_x / GB, ratio=ratio_x, ratio_f=ratio_fx,
                   ratio_g=ratio_gx,
                   layer_ratio=l_q / l_r, info_keys=len(info), profiled=prof is not None)
    del model, adapter, ctx
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows, summary


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- report
def print_table(summaries: list[dict]) -> None:
    print("\n| model | method | streaming | layers timed | s / layer (published settings) | total (extrapolated) "
          "| peak GPU GiB (measured / extrapolated) | eval overhead eager / fused / graphed (layer eager) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        fused = f"{s['ratio_f']:.2f}x" if not math.isnan(s["ratio_f"]) else "-"
        fused += f" / {s['ratio_g']:.2f}x" if not math.isnan(s["ratio_g"]) else " / -"
        print(f"| {s['model']} | {s['method']} | {'yes' if s['streaming'] else 'no'} | {s['k']}/{s['L']} | "
              f"{s['per_layer']:.1f} | {s['total'] / 60:.1f} min | {s['peak']:.1f} / {s['peak_x']:.1f} | "
              f"{s['ratio']:.2f}x / {fused} ({s['layer_ratio']:.2f}x) |")
    print("\nTargets:")
    learned = [s for s in summaries if s["method"] in LEARNED and not s["profiled"]]
    for s in learned:
        mins = s["total"] / 60
        print(f"  {s['method']} {s['model']}: calibration {mins:.1f} min ({s['k']} layers timed, extrapolated) <= "
              f"{TARGETS['freeact_minutes']:.0f} min: {'MET' if mins <= TARGETS['freeact_minutes'] else 'NOT MET'}; "
              f"peak {s['peak_x']:.1f} GiB <= {TARGETS['freeact_peak_gb']:.0f} GB: "
              f"{'MET' if s['peak_x'] <= TARGETS['freeact_peak_gb'] else 'NOT MET'}")
    if not learned:
        print("  FreeAct / FlatQuant calibration: not measured")
    for s in summaries:
        if s["method"] in ("quarot", "flatquant", "freeact"):
            modes = {"eager": s["ratio"], "fused": s["ratio_f"], "graphed": s["ratio_g"]}
            mode, best = min(((m, r) for m, r in modes.items() if not math.isnan(r)), key=lambda mr: mr[1])
            print(f"  eval overhead {s['model']}/{s['method']}: eager {s['ratio']:.2f}x, best {best:.2f}x ({mode}) <= "
                  f"{TARGETS['eval_overhead']}x: {'MET' if best <= TARGETS['eval_overhead'] else 'NOT MET'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llada_8b,dream_7b,qwen2_5_vl_7b")
    ap.add_argument("--methods", default="freeact,flatquant,quarot,gptq,rtn")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers built and calibrated (k)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15,
                    help="epochs run by the learned methods (extrapolated to 15 with the measured step time)")
    ap.add_argument("--target-nsamples", type=int, default=128, help="published calibration sequences")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-rounds", type=int, default=5,
                    help="rounds of fake-quant and bf16 forwards timed in alternation (3 timed forwards each)")
    ap.add_argument("--streaming", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--cuda-graph", choices=("on", "off"), default="on",
                    help="also time the bf16 and the fused fake-quant forward replayed from CUDA graphs (GPU only): "
                         "the devices' time without the host's launch cost (rows eval_graph_*)")
    ap.add_argument("--tf32", choices=("on", "off"), default="off",
                    help="TF32 matmuls (the learned methods train in float32)")
    ap.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="off",
                    help="block training precision of the learned methods (method.amp)")
    ap.add_argument("--compile", choices=("default", "auto", "on", "off"), default="default",
                    help="learned methods' method.compile (the weights' clip + fake quant through torch.compile)")
    ap.add_argument("--profile-eval", type=int, default=0, metavar="N",
                    help="also profile one bf16 and one fake-quant forward: the N operators that take the most time")
    ap.add_argument("--profile-calib", type=int, default=0, metavar="N",
                    help="profile the calibration and print its top N kernels (calib_profile_*.txt); no rows")
    ap.add_argument("--profile-dir", default=str(ROOT / "results" / "perf_logs"),
                    help="where --profile-eval writes eval_profile_<model>_<method>.txt")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="skip what starts after this many seconds")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 sequences unless given, 1 layer")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "perf.csv"))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of this script (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="small widths (dry run of the script, not a measurement)")
    args = ap.parse_args(argv)
    if args.quick and "--nsamples" not in " ".join(sys.argv):
        args.nsamples = 8
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_cost needs a CUDA GPU (--device cpu --tiny is a dry run of the script only)")
    unknown = [m for m in args.methods.split(",") if m not in METHODS or m not in method_names()]
    if unknown:
        raise SystemExit(f"unknown or unregistered methods {unknown}; registered: {method_names()}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    args.tf32_state = (f"tf32={args.tf32} (matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                       f"fp32 precision={torch.get_float32_matmul_precision()}, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="
                       f"{os.environ.get('TORCH_ALLOW_TF32_CUBLAS_OVERRIDE', 'unset')})")
    base = env_info()
    print(f"device: {base['device']} | torch {base['torch']} | triton {base['triton']} | transformers "
          f"{base['transformers']} | {args.nsamples}x{args.seqlen} calibration tokens, {args.layers} layer(s) timed, "
          f"epochs {args.epochs} | {args.tf32_state}")
    t0 = time.time()
    summaries, skipped, failed = [], [], []
    for method in args.methods.split(","):
        for model_name in args.models.split(","):
            if time.time() - t0 > args.budget_s:
                skipped.append(f"{model_name}/{method}")
                continue
            t1 = time.time()
            try:
                rows, s = run_one(model_name, method, args, base)
            except Exception as e:  # out of memory, or a method failing at this size: report, go on
                import traceback

                traceback.print_exc()
                print(f"{model_name}/{method}: FAILED ({type(e).__name__}: {str(e)[:300]})", flush=True)
                failed.append(f"{model_name}/{method}")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            if s["profiled"]:
                print(f"{model_name}/{method}: profiled calibration, timings not recorded")
            else:
                append_rows(args.out, rows)
            summaries.append(s)
            print(f"{model_name:14s} {method:9s} wall {s['wall']:7.1f} s | {s['per_layer']:6.2f} s/layer | "
                  f"total {s['total'] / 60:6.1f} min (extrapolated) | peak {s['peak']:.1f} GiB "
                  f"(extrapolated {s['peak_x']:.1f}) | eval x{s['ratio']:.2f} eager, x{s['ratio_f']:.2f} fused, "
                  f"x{s['ratio_g']:.2f} graphed | {time.time() - t1:.0f} s", flush=True)
    if skipped:
        print(f"skipped (budget {args.budget_s:.0f} s): {', '.join(skipped)}")
    recorded = sum(not s["profiled"] for s in summaries)
    print(f"{recorded} measurement(s) appended to {args.out}; {time.time() - t0:.0f} s")
    print_table(summaries)
    if failed:  # the others' rows are written; the exit status says that some are missing
        raise SystemExit(f"{len(failed)} measurement(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
