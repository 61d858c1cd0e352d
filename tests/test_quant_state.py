"""QuantState serialization: bitsandbytes' keys, both directions, and clear errors on corrupt state."""

import json

import pytest
import torch

from conftest import requires_bnb
from fourbit.quant import QuantState, QuantStateError, dequantize_4bit, quantize_4bit


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_roundtrip(dq, qt):
    w = torch.randn(33, 65, dtype=torch.bfloat16)
    q, s = quantize_4bit(w, qt, double_quant=dq)
    d = s.as_dict("layer.weight.")
    keys = {"layer.weight.absmax", "layer.weight.quant_map", f"layer.weight.quant_state.bitsandbytes__{qt}"}
    if dq:
        keys |= {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"}
    assert set(d) == keys
    s2 = QuantState.from_dict(d, "layer.weight.", packed=q)
    assert s2.shape == w.shape and s2.dtype == torch.bfloat16 and s2.quant_type == qt
    assert torch.equal(dequantize_4bit(q, s2), dequantize_4bit(q, s))


@requires_bnb
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_bitsandbytes_reads_ours_and_we_read_theirs(dq, qt):
    import bitsandbytes.functional as F

    w = torch.randn(40, 72, dtype=torch.float16)
    q, s = quantize_4bit(w, qt, double_quant=dq, rounding="bnb-cpu")
    theirs = F.QuantState.from_dict({k: v for k, v in s.as_dict().items()}, device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(q, theirs), dequantize_4bit(q, s))

    qb, sb = F.quantize_4bit(w, quant_type=qt, compress_statistics=dq)
    ours = QuantState.from_dict(sb.as_dict(packed=True), packed=qb)
    assert torch.equal(dequantize_4bit(qb, ours), F.dequantize_4bit(qb, sb))
    # and the JSON blob is byte-identical to bitsandbytes' own
    key = f"quant_state.bitsandbytes__{qt}"
    assert torch.equal(s.as_dict()[key], sb.as_dict(packed=True)[key])


def _state():
    q, s = quantize_4bit(torch.randn(16, 64))
    return q, s.as_dict("w.")


def _with_json(d, meta):
    d = dict(d)
    d["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return d


def _meta(d):
    return json.loads(bytes(d["w.quant_state.bitsandbytes__nf4"].tolist()))


def test_missing_key_names_it():
    _, d = _state()
    del d["w.nested_absmax"]
    with pytest.raises(QuantStateError, match="missing key 'w.nested_absmax'"):
        QuantState.from_dict(d, "w.")


def test_wrong_shapes_say_expected_and_found():
    _, d = _state()
    d["w.nested_absmax"] = torch.zeros(3)
    with pytest.raises(QuantStateError, match=r"nested_absmax must be float32 \[1\], got torch.float32 \[3\]"):
        QuantState.from_dict(d, "w.")
    _, d = _state()
    d["w.absmax"] = d["w.absmax"][:-1]
    with pytest.raises(QuantStateError, match=r"absmax must be uint8 \[16\]"):
        QuantState.from_dict(d, "w.")


def test_code_book_of_wrong_length():
    _, d = _state()
    d["w.quant_map"] = torch.zeros(15)
    with pytest.raises(QuantStateError, match=r"quant_map must be float32 \[16\], got torch.float32 \[15\]"):
        QuantState.from_dict(d, "w.")


def test_json_that_does_not_parse():
    _, d = _state()
    d["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(QuantStateError, match="JSON does not parse"):
        QuantState.from_dict(d, "w.")


@pytest.mark.parametrize("change,msg", [
    ({"blocksize": 48}, "blocksize 48; expected a power of two"),
    ({"dtype": "int8"}, "dtype 'int8'"),
    ({"shape": [16, -1]}, "expected a list of non-negative ints"),
    ({"quant_type": "int4"}, "quant_type 'int4'"),
])
def test_bad_json_fields(change, msg):
    _, d = _state()
    with pytest.raises(QuantStateError, match=msg):
        QuantState.from_dict(_with_json(d, {**_meta(d), **change}), "w.")


def test_missing_json_field_and_packed_size_mismatch():
    q, d = _state()
    meta = _meta(d)
    del meta["shape"]
    with pytest.raises(QuantStateError, match=r"lacks \['shape'\]"):
        QuantState.from_dict(_with_json(d, meta), "w.")
    with pytest.raises(QuantStateError, match="packed weight has 511 bytes; shape \\[16, 64\\] needs 512"):
        QuantState.from_dict(d, "w.", packed=q[:-1])
