"""YAML serialisation for every document the program renders.

libyaml's emitter (shipped in PyYAML's wheels) is used when present: rendering
documents for hundreds of nodes is most of the program's run time, and the C
emitter is an order of magnitude faster than the pure-Python one. Both emit
the same YAML for the same input, so the output is deterministic either way.
"""

from __future__ import annotations

from typing import Any

import yaml

_BaseDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _LiteralDumper(_BaseDumper):  # type: ignore[valid-type,misc]
    """Writes multi-line strings (scripts, keys) as literal blocks, readable on the node."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def dump(document: Any, *, literal_blocks: bool = False) -> str:
    """One YAML document, keys in the given order, long lines never folded."""
    dumper = _LiteralDumper if literal_blocks else _BaseDumper
    return yaml.dump(document, Dumper=dumper, sort_keys=False, default_flow_style=False, width=1_000_000)
