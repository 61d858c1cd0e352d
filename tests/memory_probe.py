"""Measure the RSS growth of one QLoRA training step (run as a subprocess by test_memory.py)."""
import sys, json, resource, torch
from fourbit.models import load_model
from fourbit.nn import add_lora
from fourbit.loss import causal_lm_loss
from fourbit.optim import PagedAdamW
b, t, r, ckpt, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
import psutil
proc = psutil.Process()
model, _ = load_model(path, quant="nf4", device="cpu", load_tokenizer=False)
add_lora(model, r=r, alpha=16, dropout=0.0, gradient_checkpointing=ckpt, verbose=False)
model.train()
opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (b, t)); labels = ids.clone()
import gc; gc.collect()
before = proc.memory_info().rss
peak = [before]
import threading, time
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
th = threading.Thread(target=watch); th.start()
loss, _ = causal_lm_loss(model, ids, labels); loss.backward(); opt.step(); opt.zero_grad(set_to_none=False)
stop = True; th.join()
print(json.dumps({"delta": peak[0] - before}))
