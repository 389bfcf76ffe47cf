"""The one safetensors header parser: hostile headers are a UserError naming the file, never another
exception (the CLI would report those as internal errors, exit 1)."""
from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ortho.errors import UserError
from mergekit_ortho.io.safetensors import SafetensorsFile, read_header


def _write(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _one(shape=(2, 3), dtype="F32", offsets=None, **extra):
    n = 4 * shape[0] * shape[1] if len(shape) == 2 else 0
    e = {"dtype": dtype, "shape": list(shape), "data_offsets": offsets or [0, n]}
    e.update(extra)
    return {"w": e}


def _bad(path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_valid_file_round_trips(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
         "c": torch.zeros(0, 5, dtype=torch.bfloat16), "d": torch.tensor(1.5)}
    f = tmp_path / "ok.safetensors"
    save_file(t, str(f), metadata={"format": "pt"})
    sf = SafetensorsFile(f)
    assert sf.metadata == {"format": "pt"}
    assert sf.entries["b"].dtype == "int64" and sf.entries["b"].st_dtype == "I64"
    for k, v in t.items():
        assert torch.equal(sf.read(k), v), k
    sf.close()


@pytest.mark.parametrize("shape, match", [
    ([-2, -3], "not a list of non-negative integers"),  # product 6: the old check let it pass
    ([2.0, 3], "not a list of non-negative integers"),
    (["2", 3], "not a list of non-negative integers"),
    ([True, 6], "not a list of non-negative integers"),
    ("6", "not a list of non-negative integers"),
    ([2**40, 2**40], "overflows int64"),
])
def test_bad_shapes(tmp_path, shape, match):
    h = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 24]}}
    _bad(_write(tmp_path / "x.safetensors", h, b"\0" * 24), match)


@pytest.mark.parametrize("offsets, match", [
    ([0.0, 24], "not two integers"),
    (["0", "24"], "not two integers"),
    ([0], "not two integers"),
    ([0, 24, 48], "not two integers"),
    (None, "not two integers"),
    ([-24, 0], "do not match its shape"),
    ([24, 0], "do not match its shape"),
    ([0, 20], "do not match its shape"),
])
def test_bad_offsets(tmp_path, offsets, match):
    h = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": offsets}}
    _bad(_write(tmp_path / "x.safetensors", h, b"\0" * 24), match)


def test_overlapping_and_gapped_offsets(tmp_path):
    e = lambda b: {"dtype": "F32", "shape": [2], "data_offsets": [b, b + 8]}  # noqa: E731
    _bad(_write(tmp_path / "o.safetensors", {"a": e(0), "b": e(4)}, b"\0" * 12), "overlaps")
    _bad(_write(tmp_path / "g.safetensors", {"a": e(0), "b": e(16)}, b"\0" * 24), "gaps")
    _bad(_write(tmp_path / "s.safetensors", {"a": e(0), "b": e(0)}, b"\0" * 8), "overlaps")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_entry_without_a_field(tmp_path, missing):
    h = _one()
    del h["w"][missing]
    _bad(_write(tmp_path / "x.safetensors", h, b"\0" * 24), f"has no '{missing}'")


@pytest.mark.parametrize("entry, match", [
    ([1, 2], "not an object"),
    ("F32", "not an object"),
    (None, "not an object"),
    ({"dtype": 4, "shape": [2, 3], "data_offsets": [0, 24]}, "unsupported dtype"),
    ({"dtype": "F31", "shape": [2, 3], "data_offsets": [0, 24]}, "unsupported dtype"),
])
def test_entry_of_the_wrong_type(tmp_path, entry, match):
    _bad(_write(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 24), match)


@pytest.mark.parametrize("meta", [[], "format=pt", None, {"format": 1}, {"a": {"b": "c"}}, {"n": None}])
def test_metadata_must_be_str_to_str(tmp_path, meta):
    h = dict(_one(), __metadata__=meta)
    _bad(_write(tmp_path / "x.safetensors", h, b"\0" * 24), "__metadata__")


@pytest.mark.parametrize("header", [[], "x", 3, None, [{"w": 1}]])
def test_header_not_an_object(tmp_path, header):
    _bad(_write(tmp_path / "x.safetensors", header), "not a JSON object")


def test_deeply_nested_header_is_a_user_error_not_recursion(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    _bad(_write(tmp_path / "a.safetensors", deep), "not a readable safetensors file")
    deep_obj = b'{"w":' * 100_000 + b"1" + b"}" * 100_000
    _bad(_write(tmp_path / "b.safetensors", deep_obj), "not a readable safetensors file")


def test_not_json_not_utf8_duplicates_and_lengths(tmp_path):
    _bad(_write(tmp_path / "j.safetensors", b"{not json"), "not valid JSON")
    _bad(_write(tmp_path / "u.safetensors", b'{"\xff": 1}'), "not valid JSON")
    dup = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
          b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    _bad(_write(tmp_path / "d.safetensors", dup, b"\0" * 8), "appears twice")
    (tmp_path / "short.safetensors").write_bytes(b"\1\0\0")
    _bad(tmp_path / "short.safetensors", "shorter than its 8-byte header")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    _bad(tmp_path / "long.safetensors", "past the end of the file")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _bad(tmp_path / "huge.safetensors", "past the end of the file")


def test_data_section_size_checked_unless_detecting(tmp_path):
    f = _write(tmp_path / "t.safetensors", _one(), b"\0" * 20)
    _bad(f, "truncated or padded")
    assert list(read_header(f, check_size=False).entries) == ["w"]  # detection reads the header only
    _bad(_write(tmp_path / "p.safetensors", _one(), b"\0" * 30), "truncated or padded")


def test_file_shrunk_after_open_is_a_user_error(tmp_path):
    f = _write(tmp_path / "t.safetensors", _one(), b"\0" * 24)
    sf = SafetensorsFile(f)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="file ended while reading tensor 'w'"):
        sf.read("w")
    sf.close()


def test_fuzzed_headers_parse_or_raise_user_error(tmp_path):
    """Random byte flips, insertions and truncations of a valid file for ~2 s: each one either
    parses or raises UserError; any other exception fails."""
    f = tmp_path / "ok.safetensors"
    save_file({"a.weight": torch.randn(4, 3), "b": torch.zeros(2, dtype=torch.int8), "c": torch.tensor(1.0)},
              str(f), metadata={"format": "pt", "note": "x"})
    good = f.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    rng = random.Random(1234)
    probe = tmp_path / "fuzz.safetensors"
    deadline = time.monotonic() + 2.0
    tries = parsed = 0
    while time.monotonic() < deadline:
        data = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes inside the header (length field included)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(8 + n)] = rng.randrange(256)
        elif kind == 1:  # replace a header byte with a JSON-significant one
            data[rng.randrange(8, 8 + n)] = ord(rng.choice('{}[]",:-0123456789.e'))
        elif kind == 2:  # truncate anywhere
            del data[rng.randrange(len(data)):]
        else:  # insert a byte in the header and fix the length so the JSON is parsed
            data.insert(rng.randrange(8, 8 + n), ord(rng.choice('{}[]",:-019 ')))
            data[:8] = struct.pack("<Q", n + 1)
        probe.write_bytes(bytes(data))
        tries += 1
        try:
            sf = SafetensorsFile(probe)
        except UserError as e:
            assert str(probe) in str(e)
            continue
        parsed += 1
        for k in sf.entries:
            sf.read(k)
        sf.close()
    assert tries > 100 and parsed < tries


def test_lora_files_go_through_the_same_validation(tmp_path):
    from mergekit_ortho.adapters.detect import detect_lora
    from mergekit_ortho.adapters.lora import LoraSource

    e = {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}
    h = {"lora_unet_x.lora_down.weight": e, "lora_unet_x.lora_up.weight": dict(e, data_offsets=[32, 64])}
    f = _write(tmp_path / "neg.safetensors", h, b"\0" * 64)
    with pytest.raises(UserError, match="not a list of non-negative integers"):
        detect_lora(f)
    ok = {"lora_unet_x.lora_down.weight": dict(e, shape=[2, 4]), "lora_unet_x.lora_up.weight":
          dict(e, shape=[4, 2], data_offsets=[32, 64])}
    f = _write(tmp_path / "cut.safetensors", ok, b"\0" * 40)
    assert detect_lora(f) == "kohya"  # detection reads the header only
    with pytest.raises(UserError, match="truncated or padded"):
        LoraSource(f)  # opening it to read tensors checks the data section too


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, json.dumps(_one(shape=(-2, -3))).encode()])
def test_cli_inspect_of_a_hostile_file_exits_2_with_one_line(cli, tmp_path, header):
    f = _write(tmp_path / "bad.safetensors", header, b"\0" * 24)
    rc, out, err = cli("inspect", f)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err and "not a readable safetensors file" in err and str(f) in err
