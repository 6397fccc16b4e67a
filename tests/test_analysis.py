import torch

from freeact.analysis import activation_stats, block_output_error
from freeact.data.text import mask_tokens
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.models import get_adapter
from freeact.models.token_types import TokenTypes, rules_from_names
from freeact.quant.quantizer import QuantSpec


def test_activation_stats_per_type(tiny_model):
    model = tiny_model("llada")
    adapter = get_adapter(model)
    tt = TokenTypes(rules_from_names(adapter, ["mask", "unmasked"]))
    ids = torch.randint(2, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    masked, _ = mask_tokens(ids, adapter.mask_token_id, torch.Generator().manual_seed(1), 0.3, 0.7)
    df, eig = activation_stats(model, adapter, [masked], tt, spectra=True)
    n_mask = int((masked == adapter.mask_token_id).sum())
    q0 = df[(df.layer == 0) & (df.linear == "q")].set_index("type")
    assert q0.loc["mask", "tokens"] == n_mask and q0.loc["unmasked", "tokens"] == masked.numel() - n_mask
    assert (df["max_over_median"] >= 1).all()
    # all mask tokens share one embedding: their layer-0 qkv input has rank 1
    e = eig[(0, "q", "mask")]
    assert e[1] < 1e-10 * e[0] and (eig[(0, "q", "unmasked")][1] > 1e-6 * eig[(0, "q", "unmasked")][0])


def test_block_output_error_grows_with_quantization(tiny_model):
    ref = tiny_model("llama")
    q = tiny_model("llama")
    a = get_adapter(q)
    spec = QuantSpec(bits=3)
    get_method("rtn", {}).apply(QuantContext(q, a, QuantSettings(spec, spec, QuantSpec()), None, progress=False))
    ids = [torch.randint(2, 4096, (2, 16))]
    err = block_output_error(ref, get_adapter(ref), q, a, ids)
    assert list(err.layer) == [0, 1] and (err.rel_mse > 1e-4).all()
    same = block_output_error(ref, get_adapter(ref), ref, get_adapter(ref), ids)
    assert (same.rel_mse == 0).all()
