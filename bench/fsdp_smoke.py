"""FSDP2 smoke test on CUDA (NCCL, world 1; `python bench/fsdp_smoke.py` on one GPU): a tiny Llama
with 4-bit layers + LoRA, sharded by fourbit.distributed.shard_model, against the same model
unsharded: logits, LoRA gradients and
three paged-AdamW steps. The CPU tests (tests/test_distributed.py) cover 2 ranks over gloo."""
import sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_model
from fourbit import distributed as dd
from fourbit.models import load_model
from fourbit.nn import add_lora
from fourbit.nn.adapters import lora_modules
from fourbit.optim import build_optimizer
import torch.distributed as dist
dd.init() if dd.launched() else None
if not dist.is_initialized():
    dist.init_process_group("nccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:29555")
torch.cuda.set_device(0)
m0 = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
m0.save_pretrained("/tmp/tinyg")
def build():
    torch.manual_seed(0)
    m, _ = load_model("/tmp/tinyg", quant="nf4", device="cuda", load_tokenizer=False)
    add_lora(m, r=8, alpha=16, dropout=0.0, verbose=False, gradient_checkpointing=True)
    m.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.weight.copy_((torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1).cuda())
    return m
ref, sh = build(), dd.shard_model(build())
ids = torch.randint(0, 512, (2, 64), device="cuda")
po = build_optimizer("paged_adamw", [p for p in ref.parameters() if p.requires_grad], lr=1e-3)
so = build_optimizer("paged_adamw", [p for p in sh.parameters() if p.requires_grad], lr=1e-3)
for step in range(3):
    a, b = ref(ids).logits.float(), sh(ids).logits.float()
    print("step", step, "logits max diff", (a - b).abs().max().item(), "scale", a.abs().max().item())
    a.pow(2).mean().backward(); b.pow(2).mean().backward()
    shp = dict(sh.named_parameters())
    g = max((p.grad - shp[n].grad.full_tensor()).abs().max().item() / p.grad.abs().max().item()
            for n, p in ref.named_parameters() if p.requires_grad)
    print("  grad rel diff", g)
    po.step(); so.step(); po.zero_grad(); so.zero_grad()
print("storage dtypes:", {str(p.dtype) for n, p in sh.named_parameters() if n.endswith("base_layer.weight")})
dist.destroy_process_group()
