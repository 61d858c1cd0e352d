"""Code books: NF4 derived from normal quantiles reproduces the QLoRA paper's table (Appendix E) and bitsandbytes bit for bit."""

import pytest
import torch

from conftest import requires_bnb
from fourbit.quant import dynamic_map, fp4_values, nf4_values

# The QLoRA paper's NF4 values (Appendix E), as published (float32 values printed with full precision).
SPEC_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def test_nf4_derivation_reproduces_spec_table_bit_for_bit():
    assert torch.equal(nf4_values(), torch.tensor(SPEC_NF4, dtype=torch.float32))


def test_nf4_shape_of_the_code():
    v = nf4_values()
    assert (v < 0).sum() == 7 and (v == 0).sum() == 1 and (v > 0).sum() == 8
    assert v[0] == -1 and v[-1] == 1 and torch.all(v[1:] > v[:-1])


def test_fp4_values():
    v = fp4_values()
    assert v.shape == (16,) and v[3] == 1.0 and v[11] == -1.0
    assert torch.equal(v[8:].abs(), v[:8])  # bit 3 is the sign


def test_dynamic_map_structure():
    s, u = dynamic_map(True), dynamic_map(False)
    assert s.shape == u.shape == (256,)
    assert s[127] == 0 and s[255] == 1 and s[0] == pytest.approx(-0.99296874, abs=1e-7)
    assert torch.all(s[1:] >= s[:-1]) and torch.all(u >= 0) and u[-1] == 1


@requires_bnb
def test_code_books_match_bitsandbytes():
    import bitsandbytes.functional as F

    assert torch.equal(nf4_values(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_values(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), F.create_dynamic_map(signed=False))
