"""Blockwise 4-bit quantization: byte-identical to bitsandbytes (CPU), exact against float64 math.

Oracle: bitsandbytes 0.50.2 `quantize_4bit` / `dequantize_4bit` on CPU, compared with
`rounding="bnb-cpu"`: packed bytes, absmax, nested absmax, offset and dequantized values must be
*equal* (tolerance 0). Note: bitsandbytes' `functional.quantize_4bit` defaults to FP4, so every
call here names the quant type.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import requires_bnb
from fourbit.quant import (dequantize_4bit, dequantize_blockwise_8bit, get_dynamic_map, nf4_values,
                           quantize_4bit, quantize_blockwise_8bit)
from fourbit.quant.blockwise import (_dequant4_reference, _quant4_reference, bits_per_parameter, dequantize_absmax,
                                     quantized_nbytes)
from fourbit.quant.kernels import cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7, 9), (65,), (1,), (1000, 333), (128, 256), (3, 64 * 256 + 5)]


def _bnb_quant(w, qt, bs, dq):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, quant_type=qt, blocksize=bs, compress_statistics=dq)


@requires_bnb
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 128, 256])
def test_identical_to_bitsandbytes_cpu(shape, dtype, qt, bs):
    import bitsandbytes.functional as F

    w = torch.randn(shape, dtype=dtype)
    qb, sb = _bnb_quant(w, qt, bs, True)
    q, s = quantize_4bit(w, qt, bs, double_quant=True, rounding="bnb-cpu")
    assert q.dtype == torch.uint8 and q.shape == qb.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(q, qb)
    assert torch.equal(s.absmax, sb.absmax)  # uint8 double-quantized constants
    assert torch.equal(s.nested.absmax, sb.state2.absmax)
    assert s.nested.offset == sb.offset.item()
    assert torch.equal(dequantize_absmax(s), F.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset)
    out = dequantize_4bit(q, s)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.flatten(), F.dequantize_4bit(qb, sb).flatten())


@requires_bnb
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_zero_blocks_and_partial_tail_match_bitsandbytes(qt, dq):
    import bitsandbytes.functional as F

    w = torch.randn(300)
    w[64:128] = 0  # an all-zero full block
    w[256:] = 0  # an all-zero partial tail block
    qb, sb = _bnb_quant(w, qt, 64, dq)
    q, s = quantize_4bit(w, qt, 64, double_quant=dq, rounding="bnb-cpu")
    assert torch.equal(q, qb) and torch.equal(s.absmax, sb.absmax)
    assert torch.equal(dequantize_4bit(q, s).flatten(), F.dequantize_4bit(qb, sb).flatten())


@requires_bnb
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096)], ids=str)
def test_identical_to_bitsandbytes_at_llama_sizes(shape):
    import bitsandbytes.functional as F

    w = torch.randn(shape, dtype=torch.bfloat16)
    qb, sb = _bnb_quant(w, "nf4", 64, True)
    q, s = quantize_4bit(w, "nf4", 64, double_quant=True, rounding="bnb-cpu")
    assert torch.equal(q, qb) and torch.equal(s.absmax, sb.absmax) and torch.equal(s.nested.absmax, sb.state2.absmax)
    assert torch.equal(dequantize_4bit(q, s), F.dequantize_4bit(qb, sb))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_dequantize_is_code_times_absmax_in_float64(dtype, qt):
    """Independent of bnb: every output equals round_dtype(float32(code[q] * absmax))."""
    w = torch.randn(37, 91, dtype=dtype)
    q, s = quantize_4bit(w, qt, 64, double_quant=False)
    p = q.flatten()
    codes = torch.stack([p >> 4, p & 15], 1).flatten()[: w.numel()].long()
    absmax = s.absmax.double().repeat_interleave(64)[: w.numel()]
    expect = (s.code.double()[codes] * absmax).float().to(dtype)  # float64 product of float32s is exact
    assert torch.equal(dequantize_4bit(q, s).flatten(), expect)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_codes_are_the_nearest_level(qt):
    """Each code is the nearest level to x / absmax, computed by brute force in float64."""
    w = torch.randn(64 * 50)
    q, s = quantize_4bit(w, qt, 64, double_quant=False)
    p = q.flatten()
    codes = torch.stack([p >> 4, p & 15], 1).flatten().long()
    y = (w.view(-1, 64) * (1 / s.absmax[:, None])).flatten().double()
    dist = (y[:, None] - s.code.double()[None]).abs()
    assert torch.all(dist[torch.arange(len(y)), codes] <= dist.min(1).values + 1e-12)


def test_ties_go_to_the_lower_level():
    levels = nf4_values()
    mid = ((levels[9] + levels[10]) / 2).item()  # an exact float32 midpoint
    w = torch.tensor([1.0, mid] + [0.0] * 62)  # absmax 1: scaled values are the inputs
    q, _ = quantize_4bit(w, "nf4", 64, double_quant=False)
    assert q.flatten()[0].item() == (15 << 4) | 9


@pytest.mark.parametrize("rounding", ["nearest", "bnb-cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_cpu_kernel_matches_torch_reference(rounding, dtype, qt):
    if not cpu.available(dtype):
        pytest.skip("the C kernel is not available here (no C compiler); the reference is what runs")
    for n in [1, 63, 64, 65, 64 * 300 + 17, 200_000]:
        w = torch.randn(n, dtype=dtype)
        w[:64] = 0
        q, absmax = cpu.quant4(w, 64, *_bounds(qt), rounding == "bnb-cpu", _zero(qt))
        rq, rabsmax = _quant4_reference(w, qt, 64, rounding)
        assert torch.equal(q, rq) and torch.equal(absmax, rabsmax), n
        code = nf4_values() if qt == "nf4" else _fp4()
        out = torch.empty(n, dtype=dtype)
        cpu.dequant4(q, absmax, code, n, 64, out)
        assert torch.equal(out, _dequant4_reference(q, absmax, code, n, 64, dtype))


def _bounds(qt):
    from fourbit.quant.codebook import quantize_bounds

    return quantize_bounds(qt)


def _zero(qt):
    from fourbit.quant.codebook import zero_code

    return zero_code(qt, "cpu")


def _fp4():
    from fourbit.quant import fp4_values

    return fp4_values()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), log_bs=st.integers(5, 12), qt=st.sampled_from(["nf4", "fp4"]),
       dq=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_roundtrip_error_is_bounded(n, log_bs, qt, dq, scale):
    """|dequant(quant(x)) - x| <= absmax * (largest gap between levels) / 2 (+ DQ's error on absmax)."""
    bs = 2**log_bs
    w = torch.randn(n) * scale
    q, s = quantize_4bit(w, qt, bs, double_quant=dq)
    out = dequantize_4bit(q, s)
    levels = s.code.sort().values
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    true_absmax = torch.nn.functional.pad(w.abs(), (0, s.nblocks * bs - n)).view(-1, bs).amax(1)
    absmax = dequantize_absmax(s)
    bound = (true_absmax * half_gap + (absmax - true_absmax).abs()).repeat_interleave(bs)[:n]
    assert torch.all((out - w).abs() <= bound * (1 + 1e-5) + 1e-30)


def test_dequantize_into_out_and_dtype_override():
    w = torch.randn(64, 48, dtype=torch.bfloat16)
    q, s = quantize_4bit(w)
    ref = dequantize_4bit(q, s, dtype=torch.float32)
    out = torch.empty(64, 48, dtype=torch.float32)
    assert dequantize_4bit(q, s, dtype=torch.float32, out=out) is out and torch.equal(out, ref)
    assert torch.equal(dequantize_4bit(q, s), ref.to(torch.bfloat16))  # one rounding from float32
    with pytest.raises(ValueError, match="out must be contiguous"):
        dequantize_4bit(q, s, out=torch.empty(48, 64, dtype=torch.bfloat16))


def test_quant_storage_views_the_same_bytes():
    w = torch.randn(32, 64)
    q, s = quantize_4bit(w)
    qf, _ = quantize_4bit(w, quant_storage=torch.bfloat16)
    assert qf.dtype == torch.bfloat16 and torch.equal(qf.view(torch.uint8).flatten(), q.flatten())
    assert torch.equal(dequantize_4bit(qf, s), dequantize_4bit(q, s))


# -- double quantization / 8-bit ------------------------------------------------------------------
def test_nearest_8bit_rounding_is_exact_nearest():
    x = torch.randn(256 * 40) * torch.rand(256 * 40)
    q, absmax = quantize_blockwise_8bit(x, rounding="nearest")
    code = get_dynamic_map(True).double()
    y = (x.view(-1, 256) / absmax[:, None]).flatten().double()
    dist = (y[:, None] - code[None]).abs()
    assert torch.all(dist[torch.arange(len(y)), q.long()] <= dist.min(1).values + 1e-12)


@requires_bnb
def test_bnb_cpu_8bit_rounding_matches_and_nearest_rarely_differs():
    import bitsandbytes.functional as F

    x = torch.randn(256 * 400)
    qb, sb = F.quantize_blockwise(x, blocksize=256)
    q, absmax = quantize_blockwise_8bit(x, rounding="bnb-cpu")
    assert torch.equal(q, qb) and torch.equal(absmax, sb.absmax)
    qn, _ = quantize_blockwise_8bit(x, rounding="nearest")
    differ = (qn != qb).float().mean().item()
    assert 0 < differ < 0.005  # bitsandbytes' CPU table rounding: ~0.17% of elements
    assert torch.equal(dequantize_blockwise_8bit(q, absmax), F.dequantize_blockwise(qb, sb))


def test_bits_per_parameter():
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    n = 4096 * 4096
    q, s = quantize_4bit(torch.randn(4096, 256), double_quant=True)
    assert quantized_nbytes(4096 * 256) == q.numel() + s.nbytes()
    assert quantized_nbytes(n) * 8 / n == pytest.approx(bits_per_parameter(), rel=1e-3)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,msg", [
    (torch.ones(8, dtype=torch.int32), "must be float32, float16 or bfloat16, got torch.int32"),
    (torch.ones(8, dtype=torch.bool), "got torch.bool"),
    (torch.empty(0, 4), r"cannot quantize an empty tensor \(.*shape \[0, 4\]"),
])
def test_bad_tensors(w, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_4bit(w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_with_their_index(bad):
    w = torch.randn(10, 20)
    w[3, 7] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*index \(3, 7\)"):
        quantize_4bit(w)
    quantize_4bit(w, check_finite=False)  # the escape hatch


@pytest.mark.parametrize("bs", [0, 48, 16, 8192, 64.0, True])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match=r"power of two in \[32, 4096\]"):
        quantize_4bit(torch.randn(128), blocksize=bs)


def test_bad_quant_type_and_rounding():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize_4bit(torch.randn(64), rounding="stochastic")


def test_dequantize_refuses_packed_of_the_wrong_size():
    q, s = quantize_4bit(torch.randn(10, 10))
    with pytest.raises(ValueError, match="packed data has 49 bytes but shape \\[10, 10\\] needs 50"):
        dequantize_4bit(q[:-1], s)



@requires_bnb
def test_bnb_cpu_8bit_rounding_at_grid_midpoints():
    """bitsandbytes' CPU rule is trunc(fma(t, 65535, 0.5)) on t = (x * (1/absmax) + 1) / 2: values a few
    ulps from a grid midpoint, scaled by random block maxima, land where its compiled code puts them
    (dividing by absmax, or rounding t * 65535 before adding 0.5, moves some of them by one level)."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    nblocks = 2000
    k = torch.randint(1, 65535, (nblocks, 255), generator=g).double()
    y = (2 * (k - 0.5) / 65535 - 1)  # (nblocks, 255) exactly between two grid points
    a = torch.rand(nblocks, 1, generator=g, dtype=torch.float64) * 10 + 0.01  # block maxima
    x = (y * a).float()
    x = torch.nextafter(x, x + torch.randint(-1, 2, x.shape, generator=g).float())  # +-1 ulp or none
    x = torch.cat([a.float(), x], dim=1).reshape(-1)  # each block's first element is its max
    qb, sb = F.quantize_blockwise(x, blocksize=256)
    q, absmax = quantize_blockwise_8bit(x, rounding="bnb-cpu")
    assert torch.equal(absmax, sb.absmax)
    assert int((q != qb).sum()) == 0


@requires_bnb
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 300), cols=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), qt=st.sampled_from(["nf4", "fp4"]), bs=st.sampled_from([64, 128, 256]),
       dq=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_property_identical_to_bitsandbytes_cpu(seed, rows, cols, dtype, qt, bs, dq, scale):
    """Any shape, dtype, code book, block size and scale: the same bytes as bitsandbytes 0.50 on a CPU."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    qb, sb = _bnb_quant(w, qt, bs, dq)
    q, s = quantize_4bit(w, qt, bs, double_quant=dq, rounding="bnb-cpu")
    assert torch.equal(q, qb)
    assert torch.equal(s.absmax, sb.absmax)
    if dq:
        assert torch.equal(s.nested.absmax, sb.state2.absmax) and s.nested.offset == sb.offset.item()
