"""`fourbit memory` on the paper's settings next to the paper's figures (no GPU needed).

    python bench/memory.py

NF4 + double quantization, bf16, LoRA r=64 on all linear layers (fp32 adapters), paged AdamW,
gradient checkpointing, batch 1, sequence 512 (QLoRA §5): `fourbit train`'s defaults, which a
`Plan` shares. The paper reports Guanaco 7B / 13B / 33B / 65B at about 5 / 10 / 21 / 41 GB and
65B fine-tuning within one 48 GB GPU.
"""

from fourbit.memory import (LORA_GRADIENTS, LORA_PARAMETERS, OPTIMIZER_STATES, OTHER_WEIGHTS, WEIGHTS_4BIT, Plan,
                            predict)

PAPER_GB = {"llama-7b": 5, "llama-13b": 10, "llama-33b": 21, "llama-65b": 41}  # QLoRA Table 6, Guanaco sizes


def main():
    print("| model | 4-bit weights + 16-bit rest (GiB) | LoRA params+grads+states (GiB) "
          "| predicted training peak (GiB) | paper's figure (GB) | fits 48 GB | longest seq at batch 1 in 48 GB |")
    print("|---|---:|---:|---:|---:|---|---:|")
    gib = 2**30
    for name, paper in PAPER_GB.items():
        r = predict(Plan(model=name, seq=512, batch=1, r=64, checkpointing=True, gpu="48GB"))
        p = r["parts"]
        weights = (p[WEIGHTS_4BIT] + p[OTHER_WEIGHTS]) / gib
        lora = (p[LORA_PARAMETERS] + p[LORA_GRADIENTS] + p[OPTIMIZER_STATES]) / gib
        print(f"| {name} | {weights:.1f} | {lora:.1f} | {r['total_bytes'] / gib:.1f} | {paper} | "
              f"{'yes' if r['fits'] else 'no'} | {r['max_seq_at_batch']} |")


if __name__ == "__main__":
    main()
