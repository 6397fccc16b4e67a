"""freeact.eval.cuda_graphs.GraphedForward: the forward it replays gives the eager forward's logits."""
import pytest
import torch

from freeact.eval.cuda_graphs import GraphedForward
from freeact.models.token_types import TokenTypes


def _tiny_llama(device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(device).eval()


def test_on_the_cpu_it_is_the_plain_forward():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    gf = GraphedForward(model)
    torch.testing.assert_close(gf(ids), want, rtol=0, atol=0)
    assert gf.shapes == []  # nothing captured off the GPU


def test_token_types_make_no_host_copy_or_sync_per_forward():
    """The types come from tensor ops on the input's device (no boolean-mask assignment, which synchronises,
    and the rules' ids cached per device), and are what the rules say."""
    tt = TokenTypes([("mask", [5, 7]), ("image", [7, 9]), ("text", None)])
    ids = torch.tensor([[5, 7, 9, 1], [9, 9, 0, 5]])
    types = tt.compute(ids)
    assert types.tolist() == [[0, 0, 1, 2], [1, 1, 2, 0]]  # 7 takes the first rule that lists it
    first = tt._rules_on(ids.device)
    tt.compute(ids)
    assert tt._rules_on(ids.device) is first  # converted once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_forward_matches_eager_on_the_gpu():
    model = _tiny_llama("cuda")
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    gf = GraphedForward(model)
    torch.testing.assert_close(gf(ids), want)
    other = torch.randint(0, 64, (2, 8), device="cuda")
    with torch.no_grad():
        want2 = model(input_ids=other, use_cache=False).logits
    torch.testing.assert_close(gf(other), want2)  # replayed with the new input, not the captured one
    assert gf.shapes == [(2, 8)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_fused_freeact_forward_is_captured_with_its_token_types(tiny_model):
    """The typed forward (token types from the input, the fused kernels, the shared q/k/v pipeline) in a
    graph: replays give the eager forward's logits, for a new input's types too."""
    from freeact.data.calib import CalibSet
    from freeact.kernels import fuse_input_quantizers
    from freeact.methods import QuantContext, QuantSettings, get_method
    from freeact.models import get_adapter
    from freeact.quant.quantizer import QuantSpec

    model = tiny_model("dream").cuda()
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 32), generator=g)
    ids[:, ::3] = adapter.mask_token_id
    ctx = QuantContext(model, adapter, QuantSettings(QuantSpec(4), QuantSpec(4), QuantSpec(16)), CalibSet(ids, ids),
                       batch_size=2, progress=False, device="cuda")
    get_method("freeact", {"epochs": 1}).apply(ctx)
    model = model.to(torch.bfloat16)
    fuse_input_quantizers(model, backend="triton")
    gf = GraphedForward(model)
    outs = []
    for x in (ids.cuda(), ids.flip(1).cuda()):  # the second: other mask positions, other types
        with torch.no_grad():
            want = model(input_ids=x, use_cache=False).logits
        got = gf(x).clone()
        torch.testing.assert_close(got, want)  # bf16 tolerances: cuBLAS may pick other algorithms in a capture
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 0.1  # the replay followed the new input
