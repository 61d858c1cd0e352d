"""LoftQ initialization (Li et al., 2023): start LoRA where the 16-bit model is, not where the 4-bit one is.

A fresh QLoRA adapter (B = 0) leaves the model at dequant(quant(W)), which on SmolLM2-135M costs
25% WikiText-2 perplexity before any training. LoftQ sets A and B from a rank-r truncated SVD of
the quantization residual instead, so that base + scaling * B @ A starts close to W:

    R = W - dequant(Q)            U S V^T = svd(R)        (out, in)
    B = U_r sqrt(S_r) / sqrt(s)   A = sqrt(S_r) V_r^T / sqrt(s)      s = alpha / r (the LoRA scaling)

so s * B @ A is R's best rank-r approximation (Eckart-Young), and sqrt(S) on both sides gives A
and B the same scale, as the paper does. PEFT's `loftq_init` and `replace_lora_weights_loftq`
leave out the division by s (PEFT issue #1982): with QLoRA's r=64, alpha=16 (s = 0.25) they add
only a quarter of the correction. Here the update is scaled for any alpha and rsLoRA.

# Note: Which LoftQ a user gets
The paper's algorithm alternates T steps: Q_t = quant(W - s B_{t-1} A_{t-1}), (B_t, A_t) from the
SVD of W - dequant(Q_t) (`loftq`, iterations=T). For T > 1 it CHANGES the quantized base: the
adapter is then only right on top of that base, which would have to be saved and shipped with
every adapter. `add_lora(init="loftq")` (and `fourbit train --init loftq`) does T = 1, which is
PEFT's `replace_lora_weights_loftq`: the base stays the ordinary NF4/FP4 quantization of W that
every loader produces, only A and B change, and the adapter remains a plain PEFT adapter that
works on any 4-bit copy of the base model (fourbit's, transformers + bitsandbytes'). The
alternating form is `loftq(..., iterations=T)`, for experiments (bench/perplexity.py measures it).
On SmolLM2-135M, NF4 + DQ, r=64 on every linear layer, WikiText-2 perplexity is 27.17 at fp32,
33.91 with B = 0, 31.78 at T = 1 and 31.24 at T = 5 (the relative error ||W - dequant(Q) - s B A||
/ ||W|| of layer 0's q_proj: 0.101, 0.0705, 0.0624): T = 5 closes 40% of the gap instead of 32%,
at the price of an adapter that is wrong on every other copy of the base.

LoftQ needs the 16-bit W, which a model loaded 4-bit no longer has: `add_lora` takes `weights`, a
function from module name to W, and reads one weight at a time (the 16-bit model never exists in
memory). `fourbit.models.checkpoint_weight_reader` builds it from a model's safetensors files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from fourbit.quant import QuantState, dequantize_4bit, quantize_4bit

WeightSource = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]


# Note: Top singular triplets from the Gram matrix
# LoftQ needs only the r largest singular triplets of each residual, and a full SVD (LAPACK gesdd)
# of every linear layer dominates its cost: 2.5x the time of the route taken here on this
# project's CPU (SmolLM2's seven matrices of one block, measured together). With m = min(out, in),
# the m x m Gram matrix R^T R (or R R^T) in float64 has eigenvalues S^2 and the right (left)
# singular vectors as eigenvectors; the other side follows as R V / S. Squaring costs accuracy
# only for singular values below ~1e-8 S_max (float64 has 1e-16 relative error on S^2); those
# carry no weight in the product and are dropped (zero columns), as are ranks above m.
def top_singular(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, r), S (r,), Vh (r, in)), float64, the r largest singular triplets; zero past the rank."""
    x = residual.double()
    tall = x.shape[0] >= x.shape[1]
    lam, vec = torch.linalg.eigh(x.T @ x if tall else x @ x.T)  # ascending; (m,), (m, m)
    k = min(r, lam.numel())
    lam, vec = lam.flip(0)[:k].clamp_min(0), vec.flip(1)[:, :k]
    s = lam.sqrt()
    inv = torch.where(s > 1e-7 * s[:1], 1 / s, torch.zeros_like(s))  # numerically zero: dropped
    s = torch.where(inv > 0, s, torch.zeros_like(s))
    u, vh = ((x @ vec) * inv, vec.T) if tall else (vec, (vec.T @ x) * inv[:, None])
    pad = r - k
    if pad:
        u, s, vh = (torch.nn.functional.pad(u, (0, pad)), torch.nn.functional.pad(s, (0, pad)),
                    torch.nn.functional.pad(vh, (0, 0, 0, pad)))
    return u, s, vh


@torch.no_grad()
def low_rank_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in float32 with scaling * B @ A the best rank-r approximation of
    `residual` (Eckart-Young); past the residual's rank, rows of A and columns of B are zero."""
    u, s, vh = top_singular(residual, r)  # (out, r), (r,), (r, in)
    root = (s / scaling).sqrt()  # sqrt(S / s): half of each singular value (and of 1/s) on each side
    return (root[:, None] * vh).float(), (u * root[None, :]).float()


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scaling: float, quant_type: str = "nf4", blocksize: int = 64,
          double_quant: bool = True, iterations: int = 1
          ) -> tuple[torch.Tensor, QuantState, torch.Tensor, torch.Tensor]:
    """The paper's alternating LoftQ: (packed, state, A, B) after `iterations` quantize/SVD rounds.

    iterations=1 quantizes W itself (the base every loader makes); more change the base (see Note:
    Which LoftQ a user gets). W is quantized in its own dtype; the residual is taken in float32."""
    if iterations < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iterations}")
    w = weight.float()
    target = weight
    for t in range(iterations):
        packed, state = quantize_4bit(target, quant_type, blocksize, double_quant)
        a, b = low_rank_factors(w - dequantize_4bit(packed, state, torch.float32), r, scaling)
        if t + 1 < iterations:
            target = (w - scaling * (b @ a)).to(weight.dtype)  # Q_{t+1} = quant(W - s B A)
    return packed, state, a, b


@torch.no_grad()
def residual_error(weight: torch.Tensor, dequantized: torch.Tensor, delta: torch.Tensor | None = None) -> float:
    """||W - (dequant(Q) + delta)||_F / ||W||_F: how far the starting point is from the 16-bit weight."""
    w = weight.double()
    approx = dequantized.double() + (0 if delta is None else delta.double())
    return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))


def read_weight(weights: WeightSource, name: str) -> torch.Tensor:
    """W of module `name` from a mapping or a reader function."""
    return weights[name] if isinstance(weights, Mapping) else weights(name)


@torch.no_grad()
def init_loftq(lora, weight: torch.Tensor) -> float:
    """Set a LoraLinear's A, B from its 4-bit base's residual (T = 1); returns the relative residual
    error after (for a log line). `weight` is the 16-bit W the base was quantized from."""
    base = lora.base_layer
    if tuple(weight.shape) != (lora.out_features, lora.in_features):
        raise ValueError(f"16-bit weight has shape {list(weight.shape)}, the layer is "
                         f"[{lora.out_features}, {lora.in_features}]")
    w = weight.to(device=base.packed.device, dtype=torch.float32)
    deq = base.dequantize(torch.float32)  # (out, in)
    a, b = low_rank_factors(w - deq, lora.r, lora.scaling)
    # Directions past the residual's rank have A = B = 0, which no gradient could ever leave:
    # they keep LoRA's default A (B = 0 there, so the starting point is unchanged) and still train.
    dead = ~a.any(dim=1)  # (r,)
    a[dead] = lora.lora_A.weight[dead].float()
    lora.lora_A.weight.copy_(a)
    lora.lora_B.weight.copy_(b)
    err = residual_error(w, deq, lora.delta_weight())
    assert math.isfinite(err)
    return err
