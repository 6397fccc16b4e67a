"""Typed settings of every method: one dataclass per method, the one place its keys and defaults live.

``conf/method/<name>.yaml`` selects a method and overrides some of these; :func:`parse_settings`
turns the composed ``method`` node into the dataclass, rejecting unknown keys (``+method.epocs=15``),
values of the wrong type (``method.epochs=abc``) and out-of-range values (``method.rank_ratio=2``)
with one line naming the key, before any model is loaded. Nothing here imports torch.

Experiment-wide settings for a sweep over several methods go to the top-level ``all_methods`` node
(e.g. ``all_methods: {epochs: 15, steps: 100}``): each method takes the keys it has and ignores the
rest (:func:`apply_all_methods`), so an RTN row records no ``epochs``.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

WEIGHT_ALGOS = ("rtn", "gptq", "none")
MATRICES = ("invertible", "orthogonal")
STRUCTURES = ("kronecker", "dense")
O_TRANSFORMS = ("heads", "site")
NONFINITE_MODES = ("raise", "keep_last")
INITS = ("random", "spectral")
TYPED_BASES = ("transform", "dense")
RANK_MODES = ("fixed", "per_layer")
MISSING_TYPES = ("error", "warn")
O_ONLINE = ("auto", "heads", "full", "none")
AUTO = "auto"
AMP = ("auto", "bf16", "fp16", "off")
AutoBool = Any  # true | false | "auto" (checked by each schema's check(); Hydra's schemas take no Union)

# Token-type names a model family defines ids for (its adapter's ``token_type_ids``; a test checks
# that they agree): one more name may stand for the remaining tokens.
FAMILY_TYPE_NAMES = {"causal": (), "llada": ("mask",), "dream": ("mask",), "vlm": ("vision",)}


def resolve_amp(amp: str, device) -> str:
    """A method's ``amp`` setting on ``device``: ``auto`` is bf16 on a GPU, off on a CPU."""
    return amp if amp != AUTO else ("bf16" if str(device).startswith("cuda") else "off")


class SettingsError(ValueError):
    """A bad method setting; the message names the key (``method.<key>``)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SettingsError(msg)


def _choice(obj, key: str, choices) -> None:
    v = getattr(obj, key)
    _need(v in choices, f"method.{key}={v!r} must be one of {tuple(choices)}")


def _auto_bool(obj, key: str) -> None:
    v = getattr(obj, key)
    _need(v == AUTO or isinstance(v, bool), f"method.{key}={v!r} must be auto, true or false")


def _in(obj, key: str, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    v = getattr(obj, key)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    _need(ok, f"method.{key}={v} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


# ----------------------------------------------------------------------------- the schemas
@dataclass
class MethodSettings:
    name: str = "rtn"
    label: Optional[str] = None  # row label: tells variants of one method apart in tables (default: name)
    weight_algo: str = "rtn"  # rtn | gptq | none: how the (transformed) weights are quantized

    def check(self) -> None:
        _choice(self, "weight_algo", WEIGHT_ALGOS)


@dataclass
class FullPrecisionSettings(MethodSettings):
    name: str = "fp16"


@dataclass
class RTNSettings(MethodSettings):
    mse_clip: bool = False  # search the per-channel weight clip that minimises the quantization error


@dataclass
class GPTQSettings(RTNSettings):
    name: str = "gptq"
    weight_algo: str = "gptq"
    damp: float = 0.01  # Hessian dampening, a fraction of its mean diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = False  # columns in decreasing Hessian-diagonal order

    def check(self) -> None:
        super().check()
        _in(self, "damp", 0, 1, lo_open=True)
        _need(self.block_size > 0, f"method.block_size={self.block_size} must be > 0")


@dataclass
class SmoothQuantSettings(RTNSettings):
    name: str = "smoothquant"
    alpha: float = 0.5  # migration strength: s = max|x|^alpha / max|W|^(1 - alpha)
    smooth_vo: bool = True  # also smooth o_proj's input through v_proj

    def check(self) -> None:
        super().check()
        _in(self, "alpha", 0, 1)


@dataclass
class QuaRotSettings(GPTQSettings):
    name: str = "quarot"
    mse_clip: bool = True
    act_clip_ratio: Optional[float] = 0.9  # null = keep quant.act.clip_ratio
    act_symmetric: Optional[bool] = None  # null = keep quant.act.symmetric
    kv_clip_ratio: Optional[float] = 0.95
    rotate_qk: AutoBool = AUTO  # online Hadamard on post-RoPE Q/K; auto = when the KV cache is quantized
    o_online: str = AUTO  # o_proj's input: auto | heads | full | none
    down_online: bool = True  # online Hadamard on down_proj's input
    rotation_seed: Optional[int] = None  # seed of the random Hadamard; null = the run's seed

    def check(self) -> None:
        super().check()
        for key in ("act_clip_ratio", "kv_clip_ratio"):
            if getattr(self, key) is not None:
                _in(self, key, 0, 1, lo_open=True)
        _auto_bool(self, "rotate_qk")
        _choice(self, "o_online", O_ONLINE)


@dataclass
class SpinQuantSettings(QuaRotSettings):
    name: str = "spinquant"
    act_clip_ratio: Optional[float] = None  # SpinQuant: no activation clipping
    act_symmetric: Optional[bool] = False  # SpinQuant's --a_asym
    kv_clip_ratio: Optional[float] = None
    o_online: str = "none"  # SpinQuant has no online rotation on o_proj's input
    steps: int = 20  # Cayley SGD steps (published: 100)
    lr: float = 1.5
    momentum: float = 0.0
    train_batch_size: Optional[int] = None  # null = calib.batch_size
    train_weight_quant: AutoBool = AUTO  # fake-quantize weights in the loss; auto = when weight_algo is rtn
    save_rotations: Optional[str] = None  # path to write the learned R1/R2
    load_rotations: Optional[str] = None  # path of saved R1/R2: skip training
    amp: str = AUTO  # the model's forward in training under autocast: bf16 | off; auto = bf16 on a GPU

    def check(self) -> None:
        super().check()
        _choice(self, "amp", ("auto", "bf16", "off"))  # fp16 would need loss scaling of float64 rotations
        _need(self.steps >= 0, f"method.steps={self.steps} must be >= 0")
        _need(self.lr > 0, f"method.lr={self.lr} must be > 0")
        _need(0 <= self.momentum < 1, f"method.momentum={self.momentum} must be in [0, 1)")
        _need(self.train_batch_size is None or self.train_batch_size > 0,
              f"method.train_batch_size={self.train_batch_size} must be > 0 (or null)")
        _auto_bool(self, "train_weight_quant")


@dataclass
class FlatQuantSettings(GPTQSettings):
    """FlatQuant; the published setting is epochs 15 (the default is small: tiny models in seconds)."""

    name: str = "flatquant"
    weight_algo: str = "rtn"
    epochs: int = 1  # published: 15
    lr: float = 5e-3
    clip_lr_mult: float = 10.0  # learnable clipping trains at lr x clip_lr_mult
    weight_decay: float = 0.0  # FlatQuant's code uses AdamW's 0.01; 0 keeps scales from decaying
    batch_size: int = 4  # calibration sequences per step
    on_nonfinite: str = "raise"  # raise | keep_last (restore the last finite parameters)
    matrix: str = "invertible"  # invertible (U diag(sigma) V^T) | orthogonal
    structure: str = "kronecker"  # kronecker (most square d = d_l * d_r) | dense (d x d)
    matrix_init: str = "random"  # random orthogonal | identity
    smooth_alpha: Optional[float] = 0.3  # per-channel scale init max|x|^a / max|W|^(1-a); null = no scaling
    learn_scale: bool = True
    lwc: bool = True  # learnable weight clipping (per output channel)
    lac: bool = True  # learnable activation clipping (one ratio per linear)
    vo_transform: bool = True  # per-head V/O transform (P_v fused into v_proj / o_proj)
    o_transform: str = "heads"  # heads: online P_h across heads on o_proj's input | site: a full site
    kv_transform: AutoBool = AUTO  # post-RoPE Q/K transform; auto = when the KV cache is quantized
    fuse_norms: bool = True  # fold RMSNorm scales into the following linears first (float64)
    amp: str = AUTO  # block training under autocast: bf16 | fp16 | off; auto = bf16 on a GPU, off on a CPU
    cuda_graph: AutoBool = AUTO  # each training step replayed from a CUDA graph; auto = on a GPU when it can be
    # the weights' clip + fake quant in training through torch.compile; auto = on a GPU. Off by default until
    # its speed is measured on a GPU (same values on the CPU: tests/test_flatquant.py)
    compile: AutoBool = False
    # layers trained at once, interleaved step by step, each on its own CUDA stream (the full-precision chain
    # makes them independent: the same model as 1); > 1 pays on a GPU when one layer's step leaves it idle,
    # and holds that many layers' calibration inputs and targets at once
    layers_in_flight: int = 1

    def check(self) -> None:
        super().check()
        _choice(self, "amp", AMP)
        _auto_bool(self, "cuda_graph")
        _auto_bool(self, "compile")
        _need(self.epochs >= 0, f"method.epochs={self.epochs} must be >= 0")
        _need(self.lr > 0, f"method.lr={self.lr} must be > 0")
        _need(self.clip_lr_mult > 0, f"method.clip_lr_mult={self.clip_lr_mult} must be > 0")
        _need(self.weight_decay >= 0, f"method.weight_decay={self.weight_decay} must be >= 0")
        _need(self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1")
        _need(self.layers_in_flight >= 1, f"method.layers_in_flight={self.layers_in_flight} must be >= 1")
        _choice(self, "on_nonfinite", NONFINITE_MODES)
        _choice(self, "matrix", MATRICES)
        _choice(self, "structure", STRUCTURES)
        _choice(self, "matrix_init", ("random", "identity"))
        _choice(self, "o_transform", O_TRANSFORMS)
        _auto_bool(self, "kv_transform")
        if self.smooth_alpha is not None:
            _in(self, "smooth_alpha", 0, 1)


@dataclass
class FreeActSettings(FlatQuantSettings):
    """FreeAct on FlatQuant's machinery (see ``freeact/methods/freeact.py``)."""

    name: str = "freeact"
    lr: float = 1e-3  # as reported by a re-implementation
    matrix: str = "orthogonal"  # the typed basis is orthogonal (typed_basis=dense takes any matrix)
    o_transform: str = "site"
    typed_kv: bool = True  # type the Q/K transform too (false: plain orthogonal)
    token_types: List[Any] = field(default_factory=lambda: ["mask", "unmasked"])  # names or {name, ids}
    missing_type: str = "error"  # error | warn: a configured type absent from the calibration inputs
    rank_mode: str = "fixed"  # fixed (rank_ratio) | per_layer (energy_threshold on calibration covariances)
    rank_ratio: float = 1 / 32  # r_k = d * rank_ratio for every type
    energy_threshold: float = 0.01  # per_layer: other types' energy fraction allowed on U_k
    max_rank_ratio: float = 0.25  # per_layer: r_k <= d * max_rank_ratio
    init: str = "random"  # random (orthogonal) | spectral (U_k = low-energy directions of the other types)
    spectral_mix: bool = True  # spectral: random orthogonal mixing inside each block
    typed_basis: str = "transform"  # transform (the site's own basis) | dense (a learned dense orthogonal R)

    def check(self) -> None:
        _choice(self, "typed_basis", TYPED_BASES)
        _need(self.matrix == "orthogonal" or self.typed_basis != "transform",
              f"method.matrix={self.matrix!r}: with typed_basis=transform the typed basis is the transform "
              "itself and must be orthogonal (typed_basis=dense takes any matrix)")
        _choice(self, "init", INITS)
        _choice(self, "rank_mode", RANK_MODES)
        _choice(self, "missing_type", MISSING_TYPES)
        _need(not (self.init == "spectral" and self.structure != "dense" and self.typed_basis == "transform"),
              "method.init=spectral needs method.structure=dense or method.typed_basis=dense "
              "(eigen-directions are not Kronecker-structured)")
        _in(self, "rank_ratio", 0, 1)
        _in(self, "energy_threshold", 0, 1, hi_open=True)
        _in(self, "max_rank_ratio", 0, 1)
        _need(len(self.token_types) > 0, "method.token_types must list at least one token type")
        for e in self.token_types:
            ok = isinstance(e, str) or (isinstance(e, dict) and set(e) == {"name", "ids"} and len(e["ids"]) > 0)
            _need(ok, f"method.token_types: entries are names or {{name, ids}} mappings with ids, got {e!r}")
        super().check()

    def check_token_types(self, family: str) -> None:
        """The configured names against the ids the model family defines (one more name = the rest)."""
        known = FAMILY_TYPE_NAMES.get(family, ())
        names = [e for e in self.token_types if isinstance(e, str)]
        rest = [n for n in names if n not in known]
        _need(not names or len(rest) == 1,
              f"method.token_types={names}: model family {family!r} defines ids for {list(known)}; exactly one "
              f"other name may stand for the remaining tokens, got {rest}")


SETTINGS: dict[str, type[MethodSettings]] = {
    "fp16": FullPrecisionSettings, "rtn": RTNSettings, "gptq": GPTQSettings, "smoothquant": SmoothQuantSettings,
    "quarot": QuaRotSettings, "spinquant": SpinQuantSettings, "flatquant": FlatQuantSettings,
    "freeact": FreeActSettings,
}


# ----------------------------------------------------------------------------- parsing
def _coerce(key: str, value, tp):
    """``value`` as type ``tp`` (ints are floats; nothing else converts), or SettingsError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, a)
            except SettingsError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else SettingsError(f"method.{key}={value!r} has the wrong type")
    if origin in (list, List):
        _need(isinstance(value, (list, tuple)), f"method.{key}={value!r} must be a list")
        return list(value)
    if tp is bool:
        _need(isinstance(value, bool), f"method.{key}={value!r} must be true or false")
        return value
    if tp is int:
        _need(isinstance(value, int) and not isinstance(value, bool), f"method.{key}={value!r} must be an integer")
        return value
    if tp is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), f"method.{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        _need(isinstance(value, str), f"method.{key}={value!r} must be a string")
        return value
    return value


def settings_class(name: str) -> type[MethodSettings]:
    _need(name in SETTINGS, f"method.name={name!r} is not one of {sorted(SETTINGS)}")
    return SETTINGS[name]


def parse_settings(raw: dict) -> MethodSettings:
    """The ``method`` node (a plain dict) -> its checked settings; SettingsError names the bad key."""
    name = raw.get("name", "rtn")
    cls = settings_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean method.{close[0]}?)" if close else ""
            raise SettingsError(f"method.{key} is not a setting of {name}{hint}; its settings: {sorted(fields)}")
    values = {k: _coerce(k, v, hints[k]) for k, v in raw.items()}
    s = cls(**values)
    s.check()
    return s


def as_dict(s: MethodSettings) -> dict:
    d = dataclasses.asdict(s)
    if d.get("label") is None:
        d["label"] = d["name"]
    return d


def apply_all_methods(method: dict, shared: dict, explicit: set[str] = frozenset()) -> dict:
    """``method`` with the ``all_methods`` keys its method has (the others are ignored: an RTN row records
    no ``epochs``). Precedence: a ``method.<key>`` given on the command line (``explicit``) >
    ``all_methods.<key>`` > the method's YAML. A key that no method has is an error."""
    known = set().union(*({f.name for f in dataclasses.fields(c)} for c in SETTINGS.values()))
    for key in shared:
        _need(key in known and key not in ("name", "label"),
              f"all_methods.{key} is a setting of no method; settings: {sorted(known - {'name', 'label'})}")
    own = {f.name for f in dataclasses.fields(settings_class(method.get("name", "rtn")))}
    return {**method, **{k: v for k, v in shared.items() if k in own and k not in explicit}}
