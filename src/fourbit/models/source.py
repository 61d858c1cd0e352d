"""Finding a model's files: an embedded name, a local path or a hub id -> a directory or .gguf file,
and reading a safetensors checkpoint one tensor at a time.

Only safetensors are read: a pickled checkpoint (pytorch_model.bin) is refused, since unpickling
a file can run code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fourbit.embedded import EMBEDDED, resolve_model
from fourbit.errors import UserError, redact
from fourbit.files import check_safetensors

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
                        f"({type(e).__name__}: {redact(str(e))[:200]})") from None


def checkpoint_shards(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    from fourbit.files import read_json_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, "the checkpoint's shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and v for v in weight_map.values()):
            raise UserError(f"{index}: expected a \"weight_map\" object of tensor name -> shard file name")
        shards = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{index} names shard(s) {missing[:3]} that {directory} does not hold (an incomplete "
                            f"download?)")
        return shards
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
        keys = list(check_safetensors(shard))  # a truncated or header-lying shard: one line naming it
        for key in keys:
            with safe_open(str(shard), framework="pt") as f:
                t = f.get_tensor(key)
            yield key, t


def checkpoint_keys(directory: Path) -> list[str]:
    """Every tensor name of the checkpoint, from the shards' headers (checked: fourbit.files)."""
    return [k for shard in checkpoint_shards(directory) for k in check_safetensors(shard)]


def checkpoint_shapes(directory: Path) -> dict[str, tuple[Path, list[int]]]:
    """{tensor name: (its shard, its shape)} from the shards' headers."""
    return {k: (shard, shape) for shard in checkpoint_shards(directory)
            for k, (_, shape) in check_safetensors(shard).items()}


def load_config(directory: Path, trust_remote_code: bool = False):
    """The transformers config of a model directory; UserError when it has none, it is not a JSON
    object, or transformers refuses it."""
    from transformers import AutoConfig

    from fourbit.files import read_json_file

    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; is it a model directory?")
    raw = read_json_file(directory / "config.json", "the model's config.json")
    if raw.get("auto_map") and not trust_remote_code:
        raise UserError(f"{directory}/config.json: this model needs its own Python code (auto_map: "
                        f"{', '.join(sorted(raw['auto_map']))}), and fourbit never runs code shipped with a model. "
                        f"Use a model whose architecture transformers implements (model_type {raw.get('model_type')!r} "
                        f"is not one), or a port of it that does")
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"{directory}/config.json: {_no_remote_code_hint(str(e))}") from None


def _no_remote_code_hint(message: str) -> str:
    """transformers' message without its advice to pass trust_remote_code=True, which no fourbit
    flag offers: fourbit never runs code shipped with a model."""
    if "trust_remote_code" not in message:
        return message.splitlines()[0] if message else message
    head = message.split(". ")[0].split("\n")[0]
    return (f"{head}. This model needs code that transformers does not ship; fourbit never runs code shipped "
            f"with a model, so use a model of an architecture transformers implements")


def load_tokenizer_from(directory: Path):
    """The directory's tokenizer, or None when it has no tokenizer files."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def check_shape(name: str, got, expected, where: object) -> None:
    """A UserError when a checkpoint tensor's shape is not the one the model's config.json implies."""
    if tuple(got) != tuple(expected):
        raise UserError(f"{where}: tensor {name} has shape {list(got)}, but the architecture in config.json needs "
                        f"{list(expected)}; the weights do not match their config.json (a corrupt or mixed-up "
                        f"checkpoint)")


def check_finite(name: str, t: torch.Tensor, where: object) -> None:
    """A UserError naming the tensor when it holds NaN or Inf (a corrupt checkpoint, or a diverged one)."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise UserError(f"{where}: tensor {name} has {int(bad.sum())} non-finite value(s) (NaN/Inf), first at "
                        f"index {first}; the weights are corrupt or come from a diverged run: use an intact copy "
                        f"(re-download or re-export it)")


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding NaN/Inf, or None."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            return name
    return None

