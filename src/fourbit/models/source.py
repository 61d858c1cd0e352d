"""Finding a model's files: an embedded name, a local path or a hub id -> a directory or .gguf file,
and reading a safetensors checkpoint one tensor at a time.

Only safetensors are read: a pickled checkpoint (pytorch_model.bin) is refused, since unpickling
a file can run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fourbit.embedded import EMBEDDED, resolve_model
from fourbit.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def resolve_source(name_or_path: str | os.PathLike) -> Path:
    """A local directory or .gguf file for an embedded name, a path, or a hub repository id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return Path(resolve_model(name))
    p = Path(name).expanduser()
    if p.exists():
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _download(name)
    raise UserError(f"model {name!r} not found: no such file or directory, and not an embedded model "
                    f"({', '.join(EMBEDDED)}) or a hub id (owner/name)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                               "*.model", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated: all say the same thing to the user
        raise UserError(f"model {repo_id!r} is not a local path and could not be fetched from the hub "
                        f"({type(e).__name__}: {str(e)[:200]})") from None


def checkpoint_shards(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise UserError(f"{directory} holds only pickled weights ({', '.join(pickles)}); fourbit reads safetensors "
                        f"only, since unpickling a file can run code. Convert it first (e.g. save_pretrained with "
                        f"safe_serialization=True in a trusted environment)")
    raise UserError(f"{directory} has no model.safetensors (or shards with an index); is it a model directory?")


def iter_checkpoint(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, one at a time.

    # Note: One mapping per tensor
    safetensors reads through a memory map; pages of the file that were read stay resident (and
    count in RSS) until the file is closed. Re-opening the shard for each tensor (a header parse,
    microseconds) releases them, so peak memory is the tensors we keep plus one in flight.
    """
    from safetensors import safe_open

    for shard in checkpoint_shards(directory):
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(str(shard), framework="pt") as f:
                t = f.get_tensor(key)
            yield key, t


def checkpoint_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for shard in checkpoint_shards(directory):
        with safe_open(str(shard), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def load_config(directory: Path, trust_remote_code: bool = False):
    """The transformers config of a model directory; UserError when it has none or transformers refuses it."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; is it a model directory?")
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"{directory}/config.json: {e}") from None


def load_tokenizer_from(directory: Path):
    """The directory's tokenizer, or None when it has no tokenizer files."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
