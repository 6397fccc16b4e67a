"""FreeAct's premise statistics (freeact.analysis.premise_rows / premise_stats) and the parser of the
per-layer energies FreeAct runs log (logged_energies): exact answers on synthetic data, plumbing on a
tiny model."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from freeact.analysis import ENERGY_COLUMNS, activation_stats, logged_energies, premise_rows, premise_stats
from freeact.data.text import mask_tokens
from freeact.models import get_adapter
from freeact.models.token_types import TokenTypes, rules_from_names
from freeact.transforms.affine import random_orthogonal
from freeact.transforms.typed import TypeCovariance

D = 64  # r = round(64 / 32) = 2


def _rotation(seed=0):
    return random_orthogonal(D, torch.Generator().manual_seed(seed)).to(torch.float64)


def _covs(*xs):
    acc = TypeCovariance(D, len(xs))
    for k, x in enumerate(xs):
        acc.add(x, torch.full((len(x),), k))
    return acc


def _rows(acc, names):
    return {r["type"]: r for r in premise_rows(acc.cov, names, acc.count.tolist())}


def test_orthogonal_subspaces_exact():
    """Type 0 on 5 directions, type 1 on 4 other directions (a random rotation of coordinates 0-4
    and 5-8), with known energies: exact effective ranks, room 0, principal-angle cosines 0."""
    R = _rotation()
    e0 = torch.tensor([0.5, 0.3, 0.15, 0.045, 0.005], dtype=torch.float64)  # cum .5 .8 .95 .995 1
    e1 = torch.tensor([0.7, 0.25, 0.045, 0.005], dtype=torch.float64)  # cum .7 .95 .995 1
    x0 = (3.0 * e0.sqrt()).unsqueeze(1) * R[:5]  # rows: sqrt(energy) x direction -> x^T x = R^T diag R
    x1 = (0.1 * e1.sqrt()).unsqueeze(1) * R[5:9]
    acc = _covs(torch.cat([x0, -x0]), torch.cat([x1, x1, x1]))
    rows = _rows(acc, ["a", "b"])
    a, b = rows["a"], rows["b"]
    assert (a["tokens"], b["tokens"]) == (10, 12)
    assert a["d"] == D and a["r"] == 2
    assert (a["eff_rank90"], a["eff_rank99"]) == (3, 4)
    assert (b["eff_rank90"], b["eff_rank99"]) == (2, 3)
    assert a["rank_deficiency"] == pytest.approx(1 - 4 / D)
    ea, eb = 2 * 9.0, 3 * 0.01
    assert a["energy_share"] == pytest.approx(ea / (ea + eb), rel=1e-12)
    assert a["energy_share"] + b["energy_share"] == pytest.approx(1.0, abs=1e-12)
    for row in rows.values():
        assert abs(row["room"]) < 1e-12
        assert row["angle_k"] == 2
        assert row["angle_cos_min"] < 1e-7 and row["angle_cos_mean"] < 1e-7


def test_identical_distributions():
    """The same activations for both types: cosines 1, room = the r smallest normalised eigenvalues."""
    x = torch.randn(500, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * torch.linspace(0.1, 3.0, D, dtype=torch.float64)  # anisotropic, full rank
    acc = _covs(x, x)
    C = x.T @ x
    lam = torch.linalg.eigvalsh(C / torch.trace(C))  # ascending
    for row in _rows(acc, ["a", "b"]).values():
        assert row["room"] == pytest.approx(float(lam[:2].sum()), rel=1e-9)
        assert row["room"] > 1e-4
        assert row["angle_cos_min"] == pytest.approx(1.0, abs=1e-9)
        assert row["angle_cos_mean"] == pytest.approx(1.0, abs=1e-9)
        assert row["energy_share"] == pytest.approx(0.5)
        cum = torch.cumsum(lam.flip(0), 0)
        assert row["eff_rank99"] == int((cum < 0.99).sum()) + 1 and row["eff_rank99"] < D


@pytest.mark.parametrize("theta", [0.3, 1.1])
def test_known_angle_and_room(theta):
    """Type a on one direction u, type b on cos(t) u + sin(t) w: one principal angle, cosine |cos t|;
    a one-dimensional other type leaves room 0 (d - 1 directions carry none of its energy)."""
    R = _rotation(2)
    u, w = R[0], R[1]
    v = math.cos(theta) * u + math.sin(theta) * w
    acc = _covs(torch.stack([u, -2 * u]), torch.stack([0.5 * v]))
    rows = _rows(acc, ["a", "b"])
    for row in rows.values():
        assert (row["eff_rank99"], row["eff_rank90"], row["angle_k"]) == (1, 1, 1)
        assert row["angle_cos_mean"] == pytest.approx(abs(math.cos(theta)), abs=1e-12)
        assert abs(row["room"]) < 1e-12
    assert rows["a"]["energy_share"] == pytest.approx(5 / 5.25)


def test_three_types_union_and_room():
    """Three types: 'others' is the sum of the other two's normalised covariances. a and b on two
    directions each, c on everything (block-diagonal in the same rotated basis): room of c is 0,
    a's and b's rooms are the two smallest eigenvalues of the others' sum, a is orthogonal to the
    union's top directions (b's)."""
    R = _rotation(3)
    g = torch.Generator().manual_seed(4)
    xa = R[:2] * 2.0
    xb = R[2:4].clone()
    xc = torch.cat([torch.randn(400, D - 4, generator=g, dtype=torch.float64) @ R[4:], 5.0 * R[:4]])
    acc = _covs(xa, xb, xc)
    rows = _rows(acc, ["a", "b", "c"])
    na, nb, nc = (C / torch.trace(C) for C in acc.cov)
    assert abs(rows["c"]["room"]) < 1e-12  # a + b cover 4 of 64 directions
    for k, others in (("a", nb + nc), ("b", na + nc)):
        assert rows[k]["room"] == pytest.approx(float(torch.linalg.eigvalsh(others)[:2].sum()), rel=1e-9)
        assert rows[k]["room"] > 1e-3
    assert rows["a"]["angle_k"] == 2 and rows["a"]["angle_cos_mean"] < 1e-9


def test_absent_type_and_single_type():
    R = _rotation(5)
    acc = TypeCovariance(D, 2)
    acc.add(R[:3], torch.zeros(3, dtype=torch.long))
    rows = _rows(acc, ["a", "b"])
    assert rows["a"]["eff_rank99"] == 3 and math.isnan(rows["a"]["room"]) and math.isnan(rows["a"]["angle_cos_min"])
    assert rows["b"]["tokens"] == 0 and math.isnan(rows["b"]["eff_rank99"]) and rows["b"]["energy_share"] == 0
    one = premise_rows(acc.cov[:1], ["text"], [3])
    assert len(one) == 1 and one[0]["eff_rank90"] == 3 and math.isnan(one[0]["room"])


def test_premise_stats_tiny_llada(tiny_model):
    """Plumbing on a model: one row per layer x site x type, counts per type, padding counted nowhere,
    rank-1 [MASK] input at layer 0 (all mask tokens share one embedding), ranks agree with
    activation_stats' spectra."""
    model = tiny_model("llada")
    adapter = get_adapter(model)
    tt = TokenTypes(rules_from_names(adapter, ["mask", "unmasked"]))
    ids = torch.randint(2, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    masked, _ = mask_tokens(ids, adapter.mask_token_id, torch.Generator().manual_seed(1), 0.3, 0.7)
    df = premise_stats(model, adapter, [masked[:2], masked[2:]], tt)
    assert len(df) == 2 * 4 * 2 and set(df.site) == {"qkv", "o", "mlp", "down"}
    n_mask = int((masked == adapter.mask_token_id).sum())
    q0 = df[(df.layer == 0) & (df.site == "qkv")].set_index("type")
    assert q0.loc["mask", "tokens"] == n_mask and q0.loc["unmasked", "tokens"] == masked.numel() - n_mask
    assert q0.loc["mask", "eff_rank99"] == 1 and q0.loc["unmasked", "eff_rank99"] > 1
    assert np.allclose(df.groupby(["layer", "site"]).energy_share.sum(), 1.0)
    assert df.room.between(0, 1).all() and df.angle_cos_mean.between(0, 1).all()
    # the same covariances as activation_stats (hooks on every linear, whole-model forward)
    _, eig = activation_stats(model, adapter, [masked], tt, spectra=True)
    lin = {"qkv": "q", "o": "o", "mlp": "up", "down": "down"}
    for row in df.itertuples():
        e = eig[(row.layer, lin[row.site], row.type)]
        cum = torch.cumsum(e / e.sum(), 0)
        assert row.eff_rank90 == int((cum < 0.9 - 1e-9).sum()) + 1, row

    # padding (attention_mask 0) is left out of every type
    pad = {"input_ids": masked[:2].clone(), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    pad["attention_mask"][:, 24:] = 0
    got = premise_stats(model, adapter, [pad], tt)
    g0 = got[(got.layer == 0) & (got.site == "qkv")].set_index("type")
    keep = pad["input_ids"][:, :24]
    assert g0.loc["mask", "tokens"] == int((keep == adapter.mask_token_id).sum())
    assert g0["tokens"].sum() == 48


def _runs():
    return pd.DataFrame({
        "run_hash": ["h0", "h1", "h2"],
        "model.name": ["testbed_dllm"] * 3,
        "method.name": ["freeact", "freeact", "flatquant"],
        "method.label": ["spectral", None, None],
        "seed": [0, 1, 0],
        "wiki.ppl": [1.0, 2.0, 3.0],
        "info.layer0.qkv.energy_init.mask": [0.03, 0.031, None],
        "info.layer0.qkv.energy_final.mask": [0.001, 0.02, None],
        "info.layer0.qkv.energy_init.unmasked": [0.04, 0.05, None],
        "info.layer0.qkv.energy_final.unmasked": [0.002, 0.03, None],
        "info.layer1.down.energy_init.mask": [0.1, 0.2, None],
        "info.layer1.down.energy_final.mask": [0.01, 0.02, None],
        "info.layer0.err.mask": [0.5, 0.6, None],
        "info.layer0.err.unmasked": [0.4, None, None],
        "info.layer1.err.mask": [0.7, 0.8, None],
        "info.layer0.ranks": ["2/2", "2/2", None],
    })


def test_logged_energies_long_format(tmp_path):
    runs = _runs()
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    for src in (runs, path):
        out = logged_energies(src)
        assert list(out.columns) == ["run_hash"] + ENERGY_COLUMNS
        assert set(out.run_hash) == {"h0", "h1"}  # the FlatQuant row logs nothing
        h0 = out[out.run_hash == "h0"].set_index(["layer", "site", "type"])
        assert len(h0) == 3
        assert h0.loc[(0, "qkv", "mask"), ["energy_init", "energy_final", "err"]].tolist() == [0.03, 0.001, 0.5]
        assert h0.loc[(0, "qkv", "unmasked"), "err"] == 0.4
        assert h0.loc[(1, "down", "mask"), ["energy_init", "energy_final", "err"]].tolist() == [0.1, 0.01, 0.7]
        assert (h0.method == "spectral").all() and (h0.model == "testbed_dllm").all() and (h0.seed == 0).all()
        h1 = out[out.run_hash == "h1"].set_index(["layer", "site", "type"])
        assert (h1.method == "freeact").all() and (h1.seed == 1).all()
        assert math.isnan(h1.loc[(0, "qkv", "unmasked"), "err"])
        assert h1.loc[(0, "qkv", "unmasked"), "energy_final"] == 0.03


def test_logged_energies_err_without_energies_and_nothing():
    runs = pd.DataFrame({"model.name": ["m"], "method.name": ["freeact"], "seed": [2],
                         "info.layer3.err.vision": [0.25]})
    out = logged_energies(runs)
    assert list(out.columns) == ENERGY_COLUMNS and len(out) == 1
    row = out.iloc[0]
    assert (row.layer, row.type, row.err, row.method) == (3, "vision", 0.25, "freeact")
    assert pd.isna(row.site) and pd.isna(row.energy_init)
    empty = logged_energies(pd.DataFrame({"model.name": ["m"], "method.name": ["rtn"], "seed": [0]}))
    assert empty.empty and list(empty.columns) == ENERGY_COLUMNS
