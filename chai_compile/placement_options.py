"""`--device-map` and `--max-memory`: the options, and their parsing (free of torch, so --help and option
errors stay fast; chai_compile.device_map does the rest)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chai_compile.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda")


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'20GiB' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{option}: size must be a number and a unit (B, KB, MB, GB, KiB, MiB, GiB)", value=text,
                         fix=f"e.g. {option} 0=20GiB,cpu=60GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """'0=20GiB,cpu=60GiB' -> {0: bytes, 'cpu': bytes}: the per-device budget accelerate places layers under."""
    if not text or not text.strip():
        return None
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not (key.isdigit() or key in ("cpu", "disk")):
            raise UsageError("--max-memory takes DEVICE=SIZE pairs, DEVICE a GPU index, cpu or disk", value=text,
                             fix="e.g. --max-memory 0=20GiB,cpu=60GiB")
        out[int(key) if key.isdigit() else key] = parse_size(size)
    return out


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """A named map (auto, cpu, cuda, ...) or a JSON file of module name -> device (index, 'cpu' or 'disk')."""
    if text is None or not text.strip():
        return None
    if text in NAMED_MAPS:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise UsageError(f"--device-map must be one of {', '.join(NAMED_MAPS)} or a JSON file", value=text,
                         fix="pass --device-map auto, or a JSON file mapping module names to devices")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--device-map file {path} is not JSON: {e}", fix="write an object such as "
                         '{"model.embed_tokens": 0, "model.layers": "cpu", "": 0}') from None
    if not isinstance(doc, dict) or not all(isinstance(v, int | str) for v in doc.values()):
        raise UsageError(f"--device-map file {path} must map module names to devices",
                         fix='write an object such as {"": "cpu"}')
    return doc


def device_map_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --device-map and --max-memory (passed on as the raw strings `device_map`, `max_memory`)."""
    fn = click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
                      help="Budget per device for --device-map, e.g. 0=20GiB,cpu=60GiB; what fits nowhere is "
                           "offloaded to disk.")(fn)
    return click.option("--device-map", default=None, metavar="auto|cpu|cuda|FILE.json",
                        help="Spread the model over devices through accelerate (overrides --device): auto fills "
                             "the GPUs, then the CPU, then disk; a JSON file maps module names to devices.")(fn)


def parsed(device_map: str | None, max_memory: str | None) -> dict[str, Any]:
    """load_model's keyword arguments from the two option strings."""
    if max_memory and not device_map:
        raise UsageError("--max-memory needs --device-map", value=max_memory, fix="add --device-map auto")
    return {"device_map": parse_device_map(device_map), "max_memory": parse_max_memory(max_memory)}
