"""fourbit.files: header checks of safetensors and GGUF files agree with the libraries' own readers
(safetensors' safe_open, gguf's GGUFReader) on good files and on every truncation, and say what is
wrong in one line where those readers crash with their internals."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fourbit.errors import UserError
from fourbit.files import check_gguf, check_parquet, check_safetensors, read_json_file

_TORCH_TO_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                torch.bool: "BOOL", torch.int64: "I64", torch.uint8: "U8"}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "h": torch.randn(2, 2, generator=g).half(), "i": torch.arange(-3, 3, dtype=torch.int8),
            "mask": torch.tensor([True, False, True]), "step": torch.tensor(5), "empty": torch.zeros(0, 4),
            "u": torch.arange(9, dtype=torch.uint8).reshape(3, 3)}


def _safe_open_ok(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # SafetensorError (or an OS error on a bad mmap): refused
        return False


def _rewrite_header(src, dst, edit):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return dst


# -- safetensors -------------------------------------------------------------------------------------
def test_safetensors_header_is_what_safe_open_reads(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    got = check_safetensors(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert set(got) == set(f.keys())
        for k in f.keys():
            assert got[k] == (_TORCH_TO_ST[t[k].dtype], list(f.get_slice(k).get_shape()))


def test_every_truncation_is_refused_like_safe_open_does(tmp_path):
    save_file(_tensors(), str(tmp_path / "a.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        assert not _safe_open_ok(cut), n  # the oracle refuses every truncation ...
        with pytest.raises(UserError, match=r"cut.safetensors: (truncated|not a safetensors file)"):
            check_safetensors(cut)  # ... and so do we, in words
    cut.write_bytes(raw[: len(raw) - 1])
    with pytest.raises(UserError, match=r"truncated: the header describes \d+ bytes of tensor data, the file holds"):
        check_safetensors(cut)
    cut.write_bytes(b"")
    with pytest.raises(UserError, match=r"not a safetensors file: an empty file \(0 bytes\)"):
        check_safetensors(cut)


@pytest.mark.parametrize("edit,msg", [
    (lambda h: h["w"].update(shape=[4, 5]), r"tensor 'w' is F32 \[4, 5\], 80 bytes, but its data_offsets span 60"),
    (lambda h: h["w"].update(dtype="F64"), r"tensor 'w' is F64 \[3, 5\], 120 bytes, but its data_offsets span 60"),
    (lambda h: h["w"].update(data_offsets=[h["w"]["data_offsets"][0], h["w"]["data_offsets"][1] + 4]),
     r"(overlaps the tensor before it|data_offsets span)"),
    (lambda h: h["w"].update(dtype="Q4"), r"tensor 'w' has unknown dtype 'Q4'"),
    (lambda h: h["w"].update(shape=[-3, 5]), r"tensor 'w' has shape \[-3, 5\]"),
    (lambda h: h["w"].pop("data_offsets"), r"tensor 'w' needs dtype, shape and data_offsets"),
    (lambda h: h.update(__metadata__={"format": 1}), r"__metadata__ must map names to strings"),
])
def test_a_lying_header_is_refused_like_safe_open_does(tmp_path, edit, msg):
    save_file(_tensors(), str(tmp_path / "a.safetensors"))
    bad = _rewrite_header(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", edit)
    assert not _safe_open_ok(bad)
    with pytest.raises(UserError, match=msg):
        check_safetensors(bad)


def test_other_bad_safetensors_files(tmp_path):
    save_file(_tensors(), str(tmp_path / "a.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    cases = {"trailing": (raw + b"\0\0", r"2 bytes after the last tensor's data"),
             "huge": (struct.pack("<Q", 1 << 40) + raw[8:], r"header of 1099511627776 bytes"),
             "text": (b"this is not a safetensors file at all\n", r"(header needs \d+ bytes|header of \d+ bytes)"),
             "notjson": (struct.pack("<Q", 4) + b"{{{{", r"its header is not JSON"),
             "list": (struct.pack("<Q", 2) + b"[]", r"its header is a JSON list, not an object")}
    for name, (content, msg) in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        assert not _safe_open_ok(tmp_path / f"{name}.safetensors"), name
        with pytest.raises(UserError, match=msg):
            check_safetensors(tmp_path / f"{name}.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        check_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="is a directory"):
        check_safetensors(tmp_path)


# -- GGUF -------------------------------------------------------------------------------------------------
def _write_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "tiny ünïcode")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, 2.5])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reader_ok(path) -> bool:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        for t in r.tensors:
            np.asarray(t.data).sum()
        return True
    except Exception:  # ValueError "cannot reshape array", struct errors, IndexError: refused
        return False


def test_gguf_tensors_are_what_gguf_reader_reads(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "m.gguf")
    got = check_gguf(path)
    r = gguf.GGUFReader(str(path))
    assert got == {t.name: (int(t.tensor_type), [int(d) for d in t.shape]) for t in r.tensors}


def test_every_gguf_truncation_is_refused_in_words(tmp_path):
    import gguf

    raw = _write_gguf(tmp_path / "m.gguf").read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors)
    assert end < len(raw)  # the writer pads the file's end to the alignment: those bytes may go
    cut = tmp_path / "cut.gguf"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        if n < end:
            with pytest.raises(UserError, match=r"cut.gguf: (truncated GGUF|not a GGUF file)"):
                check_gguf(cut)
            assert n % 7 or not _reader_ok(cut), n  # the reader (slow to open: every 7th) refuses, less clearly
        else:
            assert check_gguf(cut) and _reader_ok(cut), n
    cut.write_bytes(raw[:end - 10])
    with pytest.raises(UserError, match=r"truncated GGUF: tensor 'blk.0.attn_q.weight' ends at byte \d+, the file "
                                        r"has \d+"):
        check_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "a.gguf").write_text("hello, I am text")
    with pytest.raises(UserError, match=r"a.gguf: not a GGUF file: it starts with b'hell', not b'GGUF'"):
        check_gguf(tmp_path / "a.gguf")
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"not a GGUF file.*\(an empty file\)"):
        check_gguf(tmp_path / "e.gguf")
    raw = bytearray(_write_gguf(tmp_path / "m.gguf").read_bytes())
    raw[4:8] = struct.pack("<I", 7)
    (tmp_path / "v.gguf").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="GGUF version 7; fourbit reads versions 2 and 3"):
        check_gguf(tmp_path / "v.gguf")


# -- parquet and JSON -----------------------------------------------------------------------------------
def test_parquet_magic(tmp_path):
    (tmp_path / "a.parquet").write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(UserError, match=r"a.parquet: not a parquet file \(36 bytes; it starts with b'\{\"in'\)"):
        check_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(UserError, match=r"does not end with b'PAR1' \(truncated\?\)"):
        check_parquet(tmp_path / "b.parquet")


def test_parquet_check_passes_a_real_file(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="writing a parquet file needs pyarrow (the 'data' extra)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "ok.parquet")
    check_parquet(tmp_path / "ok.parquet")


def test_a_text_file_named_parquet_is_a_data_error(tmp_path):
    from fourbit.data import load_examples

    (tmp_path / "d.parquet").write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(UserError, match=r"d.parquet: not a parquet file .*Name JSON lines .jsonl"):
        load_examples(str(tmp_path / "d.parquet"))


def test_read_json_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "x": }')
    with pytest.raises(UserError, match=r"config.json:2: the model's config.json is not valid JSON \(Expecting "
                                        r"value, column 7\)"):
        read_json_file(tmp_path / "config.json", "the model's config.json")
    (tmp_path / "e.json").write_text("")
    with pytest.raises(UserError, match=r"is not valid JSON .*\(the file is empty\)"):
        read_json_file(tmp_path / "e.json", "config")
    (tmp_path / "l.json").write_text("[1]")
    with pytest.raises(UserError, match=r"l.json: config must be a JSON object, got list"):
        read_json_file(tmp_path / "l.json", "config")
    assert read_json_file(tmp_path / "l.json", "list", kind=list) == [1]
    (tmp_path / "b.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match=r"b.json: config is not UTF-8 text"):
        read_json_file(tmp_path / "b.json", "config")
    with pytest.raises(UserError, match=r"config .*nope.json does not exist"):
        read_json_file(tmp_path / "nope.json", "config")
