"""Input pipelines shared by the linears that read one input (q/k/v, gate/up): an evaluation forward
quantizes that input once and gives the same logits as one pipeline per linear."""
import copy

import torch

from freeact.data.calib import CalibSet
from freeact.methods import QuantContext, QuantSettings, get_method
from freeact.models import get_adapter
from freeact.quant.act import InputQuantizer, attach_input_quantizer, detach_input_quantizer, input_quantizers
from freeact.quant.quantizer import QuantSpec

W4A4 = QuantSettings(QuantSpec(bits=4), QuantSpec(bits=4), QuantSpec(bits=16, symmetric=False))


def _rtn_model(tiny_model, kind="llama"):
    torch.manual_seed(0)
    model = tiny_model(kind)
    adapter = get_adapter(model)
    ids = torch.randint(3, 200, (2, 16))
    calib = CalibSet(input_ids=ids, targets=ids)
    get_method("rtn", {}).apply(QuantContext(model, adapter, W4A4, calib, progress=False, batch_size=2))
    return model, adapter, ids


def test_linears_of_one_input_share_a_pipeline_that_quantizes_once(tiny_model):
    model, adapter, ids = _rtn_model(tiny_model)
    b = adapter.block(0)
    assert b.q.input_quantizer is b.k.input_quantizer is b.v.input_quantizer
    assert b.gate.input_quantizer is b.up.input_quantizer
    assert b.o.input_quantizer is not b.q.input_quantizer and b.down.input_quantizer is not b.up.input_quantizer
    assert b.q.input_quantizer.consumers == 3 and b.down.input_quantizer.consumers == 1
    # the same logits as a model whose every linear has a pipeline of its own
    alone = copy.deepcopy(model)
    for name, iq in input_quantizers(alone).items():
        attach_input_quantizer(alone.get_submodule(name), InputQuantizer(iq.spec, iq.transform))
    assert all(iq.consumers == 1 for iq in input_quantizers(alone).values())
    with torch.no_grad():
        shared_logits, alone_logits = model(input_ids=ids).logits, alone(input_ids=ids).logits
    assert torch.equal(shared_logits, alone_logits)
    # one computation per input site and layer: 4 (q/k/v, o, gate/up, down), not 7
    calls = []
    for iq in {id(m): m for m in input_quantizers(model).values()}.values():
        inner = iq.compute
        iq.compute = lambda x, inner=inner: calls.append(1) or inner(x)
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 4 * len(adapter.layers())


def test_a_shared_pipeline_recomputes_for_a_changed_input_and_counts_its_linears():
    iq = InputQuantizer(QuantSpec(bits=4))
    lins = [torch.nn.Linear(8, 8) for _ in range(3)]
    for lin in lins:
        attach_input_quantizer(lin, iq)
    assert iq.consumers == 3
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = iq(x)
        assert iq(x) is first  # served
        x.mul_(2)  # modified in place: not served again
        second = iq(x)
        assert second is not first and torch.equal(second, 2 * first)
        iq.quantize = False  # a changed setting is not served either
        assert torch.equal(iq(x), x)
    # gradients: never served from an earlier call
    iq.quantize = True
    y = torch.randn(2, 8, requires_grad=True)
    assert iq(y) is not iq(y)
    detach_input_quantizer(lins[0])
    attach_input_quantizer(lins[1], InputQuantizer(QuantSpec(bits=4)))
    assert iq.consumers == 1
