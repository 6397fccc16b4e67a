"""FreeAct: exactness on type-null data, W4A4 gain over a shared rotation, the type tensor reaching every
layer, r_k = 0 == FlatQuant restricted to orthogonal factors, spectral-init invariance on tiny dLLMs, what an exact
split can and cannot change, ranks, configs."""
from collections import Counter
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf

from freeact.artifacts import load_quantized, save_quantized
from freeact.experiment import load_model
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.methods.flatquant import FlatQuant
from freeact.methods.freeact import FreeAct
from freeact.models import get_adapter
from freeact.models.token_types import TokenTypes
from freeact.data.calib import CalibSet
from freeact.data.calib import build_calib_set as _build_calib_set
from freeact.quant.quantizer import QuantSpec, fake_quant
from freeact.transforms.affine import AffineSite, random_orthogonal
from freeact.transforms.typed import TypeMask, owner_from_ranks, ranks_from_ratio, typed_basis

Q4 = QuantSpec(4)


def build_calib_set(tokenizer, source, n, seqlen, seed, mask_token_id=None):
    """The library's calibration set, on the first 100k characters of the corpus (fast)."""
    return _build_calib_set(tokenizer, source, n, seqlen, seed, mask_token_id=mask_token_id, max_chars=100_000)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- synthetic type-null data
def typed_null_data(d, r, num_types, n, g):
    """Type k lives on ``shared + N_k`` (isotropic there): zero energy on every other type's N_j."""
    O = random_orthogonal(d, g)
    shared = O[:, num_types * r:]
    blocks = [O[:, k * r:(k + 1) * r] for k in range(num_types)]

    def draw(m):
        return [torch.randn(m, d - (num_types - 1) * r, generator=g, dtype=torch.float64)
                @ torch.cat([shared, blocks[k]], 1).T for k in range(num_types)]

    return draw(n), draw(n)  # calibration, held-out test


@pytest.mark.parametrize("num_types,seed", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_spectral_freeact_exact_and_beats_shared_rotation_w4a4(num_types, seed):
    g = torch.Generator().manual_seed(seed)
    d, r = 128, 32
    calib, test = typed_null_data(d, r, num_types, 2048, g)
    W = torch.randn(96, d, generator=g, dtype=torch.float64)
    covs = torch.stack([x.T @ x for x in calib])
    basis = typed_basis(covs, [r] * num_types, generator=g)
    assert max(basis.energy) < 1e-12  # U_k carries no energy of the other types
    tt = TokenTypes([(f"t{k}", [k]) for k in range(num_types - 1)] + [("rest", None)])
    site = TypeMask(AffineSite(d, "orthogonal", "dense", factors_init=[basis.Q], dtype=torch.float64),
                    basis.owner, tt)
    X = torch.cat(test)
    types = torch.cat([torch.full((len(x),), k) for k, x in enumerate(test)]).view(1, -1)
    y = X @ W.T
    R = random_orthogonal(d, g)
    with torch.no_grad(), tt.use(types):
        Wt = site.inner.transform_weight(W)
        exact = site(X.unsqueeze(0))[0] @ Wt.T
        freeact = fake_quant(site(X.unsqueeze(0))[0], Q4) @ fake_quant(Wt, Q4).T
    rotation = fake_quant(X @ R, Q4) @ fake_quant(W @ R, Q4).T
    assert (exact - y).abs().max() < 1e-8
    err_freeact, err_rotation = (freeact - y).pow(2).sum(), (rotation - y).pow(2).sum()
    assert err_freeact < err_rotation, (err_freeact / err_rotation).item()


@pytest.mark.parametrize("num_types", [2, 3])
def test_per_layer_ranks_recover_the_null_spaces(num_types):
    g = torch.Generator().manual_seed(5)
    d, r = 64, 12
    calib, _ = typed_null_data(d, r, num_types, 1024, g)
    covs = torch.stack([x.T @ x for x in calib])
    basis = typed_basis(covs, None, energy_threshold=1e-9, max_rank=d // 2, generator=g)
    assert basis.ranks == [r] * num_types
    loose = typed_basis(covs, None, energy_threshold=0.05, max_rank=d // 2, generator=g)
    assert loose.ranks[0] > r and max(loose.energy) <= 0.05  # a looser bound buys rank


def test_ranks_and_type_mask_errors():
    assert ranks_from_ratio(224, 1 / 32, 2) == [7, 7] and ranks_from_ratio(16, 1 / 32, 2) == [1, 1]
    assert ranks_from_ratio(128, 0, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        ranks_from_ratio(16, 0.5, 3)
    tt = TokenTypes([("mask", [1]), ("rest", None)])
    mask = TypeMask(torch.nn.Identity(), owner_from_ranks(8, [2, 2]), tt)
    x = torch.ones(1, 3, 8)
    with pytest.raises(RuntimeError, match="token types are not set"):
        mask(x)
    with tt.use(torch.zeros(1, 4, dtype=torch.long)), pytest.raises(ValueError, match="do not match"):
        mask(x)
    with tt.use(torch.tensor([[0, 1, 1]])), counting_type_reads() as reads:
        z = mask(x)
    assert z[0, 0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0] and z[0, 1].tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    assert reads == {id(mask): 1, "get": 1}


@contextmanager
def counting_type_reads():
    """Counts, per TypeMask (by id), the forwards that applied the type mask, and under "get" every read
    of the current token types (test-side instrumentation: the classes carry no counters)."""
    calls = Counter()
    masked, get = TypeMask._masked, TokenTypes.get

    def counted_masked(self, x):
        calls[id(self)] += 1
        return masked(self, x)

    def counted_get(self):
        calls["get"] += 1
        return get(self)

    with mock.patch.object(TypeMask, "_masked", counted_masked), mock.patch.object(TokenTypes, "get", counted_get):
        yield calls


# ----------------------------------------------------------------------------- tiny dLLMs
def make_ctx(model, tokenizer, w=16, a=16, kv=16, n=4, seqlen=24, seed=0, calib=None):
    ad = get_adapter(model)
    calib = calib or build_calib_set(tokenizer, "wiki.train", n, seqlen, seed, mask_token_id=ad.mask_token_id)
    q = QuantSettings(QuantSpec(w), QuantSpec(a), QuantSpec(kv, symmetric=False))
    return QuantContext(model, ad, q, calib, batch_size=2, progress=False)


def typed_modules(block):
    lins = block.linears()
    return {n: lins[n].input_quantizer.transform for n in lins} | {"kv": block.attn.qkv_hook.qk_transform}


@pytest.mark.parametrize("kind,types", [("llada", ["mask", "unmasked"]),
                                        ("dream", ["mask", {"name": "delimiter", "ids": [15, 200]}, "unmasked"])])
def test_type_tensor_reaches_every_linear_and_kv_hook(tiny_model, tokenizer, kind, types):
    model = tiny_model(kind)
    ctx = make_ctx(model, tokenizer, w=4, a=4, kv=4, n=8, seqlen=32)
    info = FreeAct({"epochs": 1, "batch_size": 4, "token_types": types}).apply(ctx)
    tt = model.freeact_token_types
    assert tt.num_types == len(types)
    counts = {k: v for k, v in info.items() if k.startswith("type_tokens.")}
    assert len(counts) == len(types) and min(counts.values()) > 0
    assert sum(counts.values()) == ctx.calib.input_ids.numel()
    for block in ctx.adapter.blocks():
        for mod in typed_modules(block).values():
            assert isinstance(mod, TypeMask) and mod.has_unique
    ids = ctx.calib.input_ids[:2]
    with torch.no_grad(), counting_type_reads() as calls:
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    total = 0
    for i, block in enumerate(ctx.adapter.blocks()):
        reads = {n: calls[id(m)] for n, m in typed_modules(block).items()}
        # every linear and the KV path of every layer read the types once per forward (linears that
        # share an input share the transform and its output), queries and keys once each
        assert reads == {"q": 1, "k": 1, "v": 1, "o": 1, "gate": 1, "up": 1, "down": 1, "kv": 2}, (i, reads)
        total += sum({id(m): calls[id(m)] for m in typed_modules(block).values()}.values())
    assert total == calls["get"]  # nothing else read the types


def test_missing_type_errors_or_warns(tiny_model, tokenizer):
    model = tiny_model("llada")
    ids = build_calib_set(tokenizer, "wiki.train", 2, 16, 0).input_ids  # no mask tokens at all
    ctx = make_ctx(model, tokenizer, calib=CalibSet(ids, ids))
    with pytest.raises(ValueError, match=r"\['mask'\] never occur"):
        FreeAct({"epochs": 0}).apply(ctx)
    with pytest.warns(UserWarning, match="never occur"):
        info = FreeAct({"epochs": 0, "missing_type": "warn"}).apply(make_ctx(tiny_model("llada"), tokenizer,
                                                                            calib=CalibSet(ids, ids)))
    assert info["type_tokens.mask"] == 0


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_rank_zero_freeact_is_the_flatquant_model(tiny_model, tokenizer, kind):
    """Same (orthogonal) transforms: quant off -> both equal the original; W4A4KV4 -> equal to each other."""
    ids = build_calib_set(tokenizer, "wiki.train", 2, 20, 7, mask_token_id=tokenizer.mask_token_id).input_ids
    flat_cfg = {"epochs": 0, "matrix": "orthogonal", "o_transform": "site"}
    outs = {}
    for bits in (16, 4):
        for name, method in (("flat", FlatQuant(flat_cfg)), ("free", FreeAct({"epochs": 0, "rank_ratio": 0}))):
            model = tiny_model(kind, torch.float64)
            with torch.no_grad():
                ref = model(input_ids=ids).logits
            method.apply(make_ctx(model, tokenizer, w=bits, a=bits, kv=bits))
            with torch.no_grad():
                outs[name, bits] = model(input_ids=ids).logits
        assert rel(outs["free", bits], outs["flat", bits]) < 1e-6
    assert rel(outs["flat", 16], ref) < 1e-6
    assert rel(outs["flat", 4], ref) > 1e-3  # the 4-bit comparison is not a comparison of two originals


def exactly_null_ctx(model, tokenizer, seqlen=12):
    """One short sequence: every site sees fewer tokens of each type than its width, so each type's
    activations are exactly rank-deficient there."""
    ids = build_calib_set(tokenizer, "wiki.train", 1, seqlen, 3).input_ids.clone()
    ids[0, ::2] = tokenizer.mask_token_id
    return make_ctx(model, tokenizer, calib=CalibSet(ids, ids)), ids


VARIANTS = {  # name -> FreeAct config (epochs 0): only the spectral ones can be exact
    "spectral": {"init": "spectral", "structure": "dense"},
    "flat_spectral": {"init": "spectral", "typed_basis": "dense", "matrix": "invertible", "o_transform": "heads"},
    "random": {"init": "random", "structure": "kronecker"},
    "flat_random": {"init": "random", "typed_basis": "dense", "matrix": "invertible"},
}


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_spectral_freeact_is_invariant_on_exactly_null_data(tiny_model, tokenizer, kind):
    results, energies = {}, {}
    for name, cfg in VARIANTS.items():
        model = tiny_model(kind, torch.float64)
        ctx, ids = exactly_null_ctx(model, tokenizer)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        info = FreeAct({"epochs": 0, "rank_ratio": 1 / 16, **cfg}).apply(ctx)
        with torch.no_grad():
            results[name] = rel(model(input_ids=ids).logits, ref)
        assert all(min(map(int, v.split("/"))) > 0 for k, v in info.items() if k.endswith(".ranks"))
        energies[name] = [v for k, v in info.items() if ".energy_" in k]
        # every typed site logs both types' energies, before and after (here: untrained) training
        assert {k.rsplit(".", 1)[-1] for k in info if ".energy_init." in k} == {"mask", "unmasked"}
        assert len([k for k in info if ".energy_final." in k]) == len([k for k in info if ".energy_init." in k])
    for name in ("spectral", "flat_spectral"):
        assert results[name] < 1e-6
        assert max(energies[name]) < 1e-10
    for name in ("random", "flat_random"):  # zeroing random directions is not exact: the checks above can fail
        assert results[name] > 1e-3
        assert max(energies[name]) > 1e-3


def test_per_layer_spectral_with_typed_kv_is_invariant_on_exactly_null_data(tiny_model, tokenizer):
    model = tiny_model("llada", torch.float64)
    ctx, ids = exactly_null_ctx(model, tokenizer)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    info = FreeAct({"epochs": 0, "init": "spectral", "structure": "dense", "rank_mode": "per_layer",
                    "energy_threshold": 1e-10, "kv_transform": True}).apply(ctx)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert rel(out, ref) < 1e-6
    ranks = [tuple(map(int, v.split("/"))) for k, v in info.items() if k.endswith(".ranks")]
    assert any(min(r) > 0 for r in ranks)  # some sites really split their basis


def test_quantized_freeact_model_saves_and_reloads(compose, tmp_path):
    cfg = compose(["model=tiny_dream", "method=freeact", "quant=w4a4kv4", "method.init=spectral",
                   "method.structure=dense"])
    model, tok = load_model(cfg.model, "cpu", seed=cfg.seed)
    ctx = make_ctx(model, tok, w=4, a=4, kv=4, n=4, seqlen=32)
    get_method(cfg.method.name, OmegaConf.to_container(cfg.method)).apply(ctx)
    ids = ctx.calib.input_ids[:2]
    save_quantized(model, cfg, tmp_path)
    loaded, _, _ = load_quantized(tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.input_quantizer.transform is attn.v_proj.input_quantizer.transform  # still one site
    assert attn.q_proj.input_quantizer.transform.token_types is loaded.freeact_token_types


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment,key,value", [
    ("freeact_no_clip", "lac", False), ("freeact_r64", "rank_ratio", 1 / 64), ("freeact_r4", "rank_ratio", 0.25),
    ("freeact_r0", "rank_ratio", 0.0), ("freeact_per_layer", "rank_mode", "per_layer"),
    ("freeact_spectral", "init", "spectral"), ("freeact_random", "init", "random"),
    ("freeact_3types", "token_types", None)])
def test_ablation_configs_compose(compose, experiment, key, value):
    cfg = compose(["model=tiny_llada", f"+experiment={experiment}"])
    m = get_method(cfg.method.name, OmegaConf.to_container(cfg.method))
    assert isinstance(m, FreeAct)
    if value is not None:
        assert m.cfg[key] == value
    else:
        assert len(m.cfg["token_types"]) == 3


def test_freeact_config_defaults_and_errors(compose):
    cfg = compose(["model=tiny_dream", "method=freeact"])
    m = get_method(cfg.method.name, OmegaConf.to_container(cfg.method))
    assert m.cfg["lr"] == 1e-3 and m.cfg["rank_ratio"] == 1 / 32 and list(m.cfg["token_types"]) == ["mask", "unmasked"]
    with pytest.raises(ValueError, match="needs method.structure=dense"):
        FreeAct({"init": "spectral", "structure": "kronecker"})
    with pytest.raises(ValueError, match="orthogonal"):
        FreeAct({"matrix": "invertible"})
    with pytest.raises(ValueError, match="rank_mode"):
        FreeAct({"rank_mode": "auto"})


# ----------------------------------------------------------------------------- what the split can do
def test_exact_split_quantizes_bit_for_bit_like_the_untyped_basis():
    """Where the premise holds (each type has no energy on the other types' blocks), zeroing changes
    nothing the quantizer sees: typed and untyped activations on the same basis quantize identically."""
    g = torch.Generator().manual_seed(3)
    d, r = 128, 32
    calib, test = typed_null_data(d, r, 2, 1024, g)
    basis = typed_basis(torch.stack([x.T @ x for x in calib]), [r, r], generator=g)
    tt = TokenTypes([("t0", [0]), ("rest", None)])
    site = TypeMask(AffineSite(d, "orthogonal", "dense", factors_init=[basis.Q], dtype=torch.float64), basis.owner, tt)
    X = torch.cat(test).unsqueeze(0)
    types = torch.cat([torch.full((len(x),), k) for k, x in enumerate(test)]).view(1, -1)
    with torch.no_grad(), tt.use(types):
        typed = site(X)
        untyped = site.inner(X)
    assert (typed - untyped).abs().max() < 1e-12  # only float rounding noise is zeroed
    assert torch.equal(fake_quant(typed, Q4), fake_quant(untyped, Q4))


def test_zeroing_never_lowers_the_activation_error_at_a_fixed_scale():
    """Off the premise (random data), a zeroed coordinate errs by |z|, a rounded one by at most half a
    step and by |z| when |z| rounds to 0: per token with an unchanged scale, typed error >= untyped."""
    g = torch.Generator().manual_seed(4)
    d = 64
    owner = owner_from_ranks(d, [8, 8])
    tt = TokenTypes([("t0", [0]), ("rest", None)])
    site = TypeMask(AffineSite(d, "orthogonal", "dense", init="random", generator=g, dtype=torch.float64), owner, tt)
    X = torch.randn(1, 512, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
    types = torch.randint(0, 2, (1, 512), generator=g)
    with torch.no_grad(), tt.use(types):
        z_typed, z = site(X), site.inner(X)
    err_typed = (fake_quant(z_typed, Q4) - z).pow(2).sum(-1)[0]
    err_untyped = (fake_quant(z, Q4) - z).pow(2).sum(-1)[0]
    same_scale = (z_typed.abs().amax(-1) == z.abs().amax(-1))[0]
    assert same_scale.float().mean() > 0.7  # most tokens' largest coordinate is not zeroed
    assert torch.all(err_typed[same_scale] >= err_untyped[same_scale] - 1e-12)
    assert err_typed[same_scale].sum() > err_untyped[same_scale].sum()  # strictly worse in total here


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_dense_typed_basis_on_flatquant_is_invariant(tiny_model, tokenizer, kind):
    """typed_basis=dense: FlatQuant's invertible Kronecker transform then a dense orthogonal R, float64,
    quantization off, no split: the transformed model is the original."""
    ids = build_calib_set(tokenizer, "wiki.train", 2, 20, 7, mask_token_id=tokenizer.mask_token_id).input_ids
    model = tiny_model(kind, torch.float64)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    info = FreeAct({"epochs": 0, "typed_basis": "dense", "matrix": "invertible", "rank_ratio": 0,
                    "o_transform": "heads"}).apply(make_ctx(model, tokenizer))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert rel(out, ref) < 1e-6
    assert all(v == "0/0" for k, v in info.items() if k.endswith(".ranks"))


def test_seed_changes_calibration_windows_masks_and_initial_transforms(tokenizer):
    a = _build_calib_set(tokenizer, "wiki.train", 4, 32, 0, mask_token_id=tokenizer.mask_token_id, max_chars=100_000)
    b = _build_calib_set(tokenizer, "wiki.train", 4, 32, 1, mask_token_id=tokenizer.mask_token_id, max_chars=100_000)
    assert not torch.equal(a.targets, b.targets)  # other windows
    assert not torch.equal(a.input_ids == tokenizer.mask_token_id, b.input_ids == tokenizer.mask_token_id)  # masks
    ctx0, ctx1 = (type("C", (), {"seed": s})() for s in (0, 1))
    m = FreeAct()
    assert not torch.equal(torch.randn(4, generator=m._generator(ctx0, 0, 0)),
                           torch.randn(4, generator=m._generator(ctx1, 0, 0)))


@pytest.mark.parametrize("with_post", [False, True])
def test_zeroed_energy_through_the_factors_is_the_dense_definition(with_post):
    """The logged energies use ``X -> X M`` by the site's own structure; they must equal the definition
    ``diag(M^T C M)`` with the dense ``M`` (float64), for a Kronecker site with a scale and with a post-rotation."""
    from freeact.transforms.typed import zeroed_energy

    g = torch.Generator().manual_seed(0)
    d = 24
    site = AffineSite(d, "invertible", "kronecker", scale=torch.rand(d, generator=g, dtype=torch.float64) + 0.5,
                      generator=g, post_init=random_orthogonal(d, g) if with_post else None, dtype=torch.float64)
    fr = site.frozen()
    M = AffineSite.frozen_act_matrix(fr)
    X = torch.randn(3, d, dtype=torch.float64, generator=g)
    torch.testing.assert_close(AffineSite.apply_frozen_act(fr, X), X @ M, rtol=1e-12, atol=1e-12)
    A = torch.randn(2, 50, d, dtype=torch.float64, generator=g)
    covs = A.transpose(1, 2) @ A
    owner = owner_from_ranks(d, [3, 5])
    fast = zeroed_energy(M, owner, covs, right=lambda C: AffineSite.apply_frozen_act(fr, C))
    dense = zeroed_energy(M, owner, covs)
    for j in range(2):
        E = torch.diagonal(M.T @ covs[j] @ M)
        other = (owner >= 0) & (owner != j)
        ref = float(E[other].sum() / E.sum())
        assert 0 < ref < 1
        assert fast[j] == pytest.approx(ref, rel=1e-12) and dense[j] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("block", [None, 4, 7])
def test_type_covariance_by_upper_blocks_is_the_full_sum(block):
    """Blocked accumulation (upper blocks, mirrored on read) equals ``sum x_k^T x_k`` per type in float64, also
    when read between additions and when a type is absent from a batch."""
    from freeact.transforms.typed import TypeCovariance

    g = torch.Generator().manual_seed(0)
    d, n = 17, 3
    acc = TypeCovariance(d, n, block=block)
    ref = torch.zeros(n, d, d, dtype=torch.float64)
    counts = [0] * n
    for step in range(4):
        x = torch.randn(5, 8, d, generator=g)
        t = torch.randint(0, n - 1 if step == 1 else n, (5, 8), generator=g)
        acc.add(x, t)
        for k in range(n):
            xk = x.reshape(-1, d)[t.reshape(-1) == k].double()
            ref[k] += xk.T @ xk
            counts[k] += len(xk)
        if step == 2:
            torch.testing.assert_close(acc.cov, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cov, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(acc.cov, acc.cov.transpose(-1, -2))
    assert acc.count.tolist() == counts
