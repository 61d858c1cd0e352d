"""Data-parallel QLoRA on torch.distributed: every rank holds the 4-bit base, gradients of the
LoRA parameters are summed across ranks once per optimizer step.

Launch with torchrun (`torchrun --nproc-per-node N -m fourbit train ...`, or several machines
with torchrun's rendezvous); `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
and starts the process group (NCCL on GPUs, gloo on CPUs) with a timeout, so a rank that dies
makes the others fail with a clear error instead of waiting forever (torchrun also stops the
remaining workers when one exits with an error).

# Note: Exactly one big batch
Each global micro-batch (batch_size x world examples, in the single-process order) is split
across ranks; the loss of every rank is its sum over labelled tokens divided by the token count
of the *whole* accumulated global batch (an all_reduce of counts), and the LoRA gradients are
all_reduce-summed after the last micro-batch. The result is the gradient of the global batch,
the same as one process with batch_size x world (up to float summation order): DDP's
gradient averaging would instead weight ranks equally whatever their token counts. The
gradients are few (LoRA only) and synced once per step, flattened into one buffer.

Only rank 0 writes checkpoints (each rank adds its own RNG state to it), logs and plots.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fourbit.errors import UserError


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float = 600) -> torch.device | None:
    """Join the process group torchrun set up; returns this rank's device (None when not launched)."""
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def sum_scalar(x: float, device: torch.device) -> float:
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients of `params` across ranks, as one flat buffer."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether shard_model has sharded the model's trainable parameters."""
    return any(hasattr(p, "device_mesh") for p in model.parameters() if p.requires_grad)


def my_share(indices: list[int]) -> list[int]:
    """This rank's slice of a global micro-batch (contiguous, sizes differing by at most one)."""
    n, w, r = len(indices), world(), rank()
    lo, hi = r * n // w, (r + 1) * n // w
    return indices[lo:hi]


# Note: Sharding the 4-bit base (FSDP2)
# Data parallelism keeps a whole 4-bit base on every rank. `shard_model` instead splits it with
# torch's FSDP2 (`fully_shard`): each decoder layer is one unit whose parameters are stored 1/N
# per rank and all-gathered just before the layer runs (forward, and again before its backward),
# then freed. The packed codes of every Linear4bit become a frozen float parameter (the bytes
# reinterpreted, zero-padded to whole elements: bitsandbytes' quant_storage), which FSDP2 can
# shard and all-gather; the small block constants stay whole on every rank. LoRA parameters are
# sharded too: FSDP2 reduce-scatters their gradients, with its averaging turned off so that the
# trainer's global-token normalisation (Note: Exactly one big batch) holds unchanged, and the
# optimizer updates each rank's shard. Peak memory per rank ≈ (4-bit layers + adapters + states)/N
# + embeddings and lm_head + one layer gathered + activations.


def shard_model(model: torch.nn.Module, storage_dtype: torch.dtype | None = None, mesh=None) -> torch.nn.Module:
    """Shard a fourbit model (4-bit base + LoRA) across the process group with FSDP2, in place.

    storage_dtype: the float dtype the packed bytes are stored as (default: the LoRA parameters'
    dtype). Every other parameter keeps its dtype: FSDP2 all-gathers mixed dtypes.
    Call after `add_lora` and before building the optimizer; returns the model."""
    from torch.distributed.fsdp import fully_shard

    from fourbit.nn import Linear4bit

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError("shard_model needs a process group: launch with torchrun and call fourbit.distributed.init()")
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = storage_dtype or (trainable[0].dtype if trainable else torch.float32)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.set_storage_dtype(dtype)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or []
    if not layers:
        raise UserError(f"shard_model: found no decoder layers in {type(model).__name__} (expected .layers or .h)")
    # Only the decoder layers are sharded: embeddings, final norm and lm_head (frozen, ~1-3% of a
    # large model) stay whole on every rank, since fourbit's loss calls the decoder and lm_head
    # separately (chunked cross-entropy), outside any root module's forward.
    units = list(layers)
    for unit in units:
        fully_shard(unit, mesh=mesh)
        # sum, not average: the loss is already normalised by the global token count
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model
