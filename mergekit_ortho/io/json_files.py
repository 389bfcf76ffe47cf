"""Reading the JSON files that come with models and states, checked against what we use.

Every JSON file we read (a shard index, ``config.json``, ``adapter_config.json``, ``state.json``, a
bundle manifest) arrives from outside: it may be nested 100,000 deep (``json.loads`` then raises
RecursionError), be an array where an object belongs, or hold ``"abc"`` where a number belongs.
``read_object`` turns each of those into one line naming the file; ``check_fields`` checks the
types of the fields a caller uses, naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError, shown

MAX_JSON_BYTES = 64 * 2**20  # far above any config or index; a bigger one is not what it claims


def read_object(path: Path, what: str = "JSON file") -> dict:
    """The JSON object in ``path``; one line naming the file for anything else."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{path}: {size:,} bytes is too large for a {what}")
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{path}: corrupt {what}, nested too deeply to be valid JSON") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the {what} is not UTF-8 text") from None
    except ValueError as e:
        raise UserError(f"{path}: corrupt {what}, not valid JSON ({str(e)[:200]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: corrupt {what}, expected a JSON object, not {type(data).__name__}")
    return data


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object", type(None): "null"}


def _matches(value: Any, expected: tuple) -> bool:
    for t in expected:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def check_fields(data: Mapping, spec: Mapping[str, type | tuple], path: Path, required: tuple[str, ...] = ()) -> None:
    """Each present field of ``spec`` has one of its types (``float`` accepts integers, ``bool`` is
    no number); the ``required`` ones are present."""
    for key in required:
        if key not in data:
            raise UserError(f"{path}: field '{key}' is missing")
    for key, types in spec.items():
        if key not in data:
            continue
        expected = types if isinstance(types, tuple) else (types,)
        if not _matches(data[key], expected):
            want = " or ".join(_NAMES.get(t, t.__name__) for t in expected)
            raise UserError(f"{path}: field '{key}' must be {want}, got {shown(data[key])}")
