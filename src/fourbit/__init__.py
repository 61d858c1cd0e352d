"""fourbit: QLoRA fine-tuning (Dettmers et al., 2023) implemented from the numbers up.

NF4 + double quantization (`fourbit.quant`), frozen 4-bit linears with LoRA (`fourbit.nn`),
paged optimizers (`fourbit.optim`), instruction tuning (`fourbit.train`), evaluation
(`fourbit.eval`), merging and GGUF export (`fourbit.export`) and a memory planner
(`fourbit.memory`); the `fourbit` command's subcommands live in `fourbit.commands`.

Public names are imported lazily so that `import fourbit` and `fourbit --help` stay fast:
torch and transformers load only when something that needs them is touched.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "quantize_4bit": "fourbit.quant",
    "dequantize_4bit": "fourbit.quant",
    "QuantState": "fourbit.quant",
    "Linear4bit": "fourbit.nn",
    "LoraLinear": "fourbit.nn",
    "add_lora": "fourbit.nn",
    "save_adapter": "fourbit.nn",
    "load_adapter": "fourbit.nn",
    "load_model": "fourbit.models",
    "load_model_and_adapter": "fourbit.models",
    "ModelArgs": "fourbit.models",
    "quantize_checkpoint": "fourbit.models",
    "merge_adapter": "fourbit.export",
    "PagedAdamW": "fourbit.optim",
    "AdamW8bit": "fourbit.optim",
    "PagedAdamW8bit": "fourbit.optim",
    "TrainConfig": "fourbit.train",
    "train": "fourbit.train",
    "UserError": "fourbit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")
