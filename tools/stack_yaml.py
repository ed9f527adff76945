"""Rewriting a stack file's settings in place: only the values that change or go, every other byte (comments,
quoting, order, layout) as it was. `tools.promote` writes a release into the next stack's file with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from model.release import SCALAR_SHORTHANDS


class Refused(Exception):
    """A promotion (or a rewrite of a stack file) that must not happen; the message is the one-line reason."""


@dataclass(frozen=True)
class _Edit:
    start: int
    end: int
    text: str


def _scalar(value: str, style: str | None) -> str:
    """`value` as a YAML scalar in the original quoting style, or plain when that reads back unchanged."""
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style == '"' or yaml.safe_load(value) != value or value != value.strip():
        return json.dumps(value)
    return value


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _last_leaf_end(node: yaml.Node) -> int:
    """Where the text of a block collection's last value ends (a block node's own end mark runs past it)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _last_leaf_end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _last_leaf_end(node.value[-1])
    return int(node.end_mark.index)


def _insert(text: str, mapping: yaml.MappingNode, key: str, value_text: str) -> _Edit:
    """An edit adding `key: value_text` as the last entry of `mapping`, in its own style."""
    if mapping.flow_style:
        close = int(mapping.end_mark.index) - 1
        separator = ", " if mapping.value else ""
        return _Edit(close, close, f"{separator}{key}: {value_text}")
    if not mapping.value:
        raise Refused("cannot add to an empty block mapping in the stack file; add the key by hand")
    indent = " " * int(mapping.value[0][0].start_mark.column)
    line_end = text.find("\n", _last_leaf_end(mapping))
    if line_end == -1:
        return _Edit(len(text), len(text), f"\n{indent}{key}: {value_text}\n")
    return _Edit(line_end + 1, line_end + 1, f"{indent}{key}: {value_text}\n")


def rewrite_settings(
    text: str, settings: Mapping[tuple[str, ...], str], shorthands: Mapping[str, str] | None = None
) -> str:
    """Set each `(top-level key, [nested key])` under `config:` to its value, touching no other byte.

    A key that exists gets its scalar replaced in place, in its quoting style; a missing one is added as the
    last entry of its mapping, in that mapping's style (flow or block). `shorthands` names the top-level keys
    whose plain scalar stands for one field (`image: URL` is `image: {url: URL}`): such a scalar is replaced
    in place, or turned into a flow mapping when another field must be set beside it.
    """
    shorthands = shorthands or {}
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode) or _find(root, "config") is None:
        raise Refused("the stack file has no `config:` mapping")
    found = _find(root, "config")
    assert found is not None
    config = found[1]
    if not isinstance(config, yaml.MappingNode):
        raise Refused("the stack file's `config:` is not a mapping")
    edits: list[_Edit] = []
    by_top: dict[str, dict[tuple[str, ...], str]] = {}
    for path, value in settings.items():
        by_top.setdefault(path[0], {})[path[1:]] = value
    for top, nested in by_top.items():
        entry = _find(config, top)
        short = shorthands.get(top)
        if short is not None and set(nested) == {(short,)} and (entry is None or isinstance(entry[1], yaml.ScalarNode)):
            nested = {(): nested[(short,)]}
        if entry is not None and short is not None and isinstance(entry[1], yaml.ScalarNode) and () not in nested:
            scalar = entry[1]
            fields = {short: scalar.value, **{path[0]: value for path, value in nested.items()}}
            inner = ", ".join(f"{key}: {_scalar(value, None)}" for key, value in fields.items())
            edits.append(_Edit(int(scalar.start_mark.index), int(scalar.end_mark.index), "{" + inner + "}"))
            continue
        if entry is None:
            if () in nested:
                edits.append(_insert(text, config, top, _scalar(nested[()], None)))
            else:
                inner = ", ".join(f"{path[0]}: {_scalar(value, None)}" for path, value in nested.items())
                edits.append(_insert(text, config, top, "{" + inner + "}"))
            continue
        for path, value in nested.items():
            node = entry[1]
            for key in path:
                if not isinstance(node, yaml.MappingNode):
                    raise Refused(f"{top} in the stack file is not a mapping; cannot set {'.'.join(path)}")
                child = _find(node, key)
                if child is None:
                    edits.append(_insert(text, node, key, _scalar(value, None)))
                    break
                node = child[1]
            else:
                if not isinstance(node, yaml.ScalarNode) or node.style in ("|", ">"):
                    raise Refused(f"{top} {'.'.join(path)} in the stack file is not a one-line scalar")
                edits.append(_Edit(int(node.start_mark.index), int(node.end_mark.index), _scalar(value, node.style)))
    for edit in sorted(edits, key=lambda e: (e.start, e.end), reverse=True):
        text = text[: edit.start] + edit.text + text[edit.end :]
    return text


def _removal(text: str, mapping: yaml.MappingNode, index: int, where: str) -> _Edit:
    """An edit taking entry `index` out of `mapping`, and with it nothing but its own text.

    Block style: the entry's whole lines (its key's line to the end of its value's last line, a comment on
    those lines included); a comment line before or after it stays. Flow style: the entry and one separator.
    """
    if len(mapping.value) == 1:
        raise Refused(f"removing {where} would leave an empty mapping in the stack file; remove it by hand")
    key, value = mapping.value[index]
    if mapping.flow_style:
        if index + 1 < len(mapping.value):
            return _Edit(int(key.start_mark.index), int(mapping.value[index + 1][0].start_mark.index), "")
        return _Edit(int(mapping.value[index - 1][1].end_mark.index), int(value.end_mark.index), "")
    start = text.rfind("\n", 0, int(key.start_mark.index)) + 1
    if text[start : int(key.start_mark.index)].strip():
        raise Refused(f"{where} does not start its own line in the stack file; remove it by hand")
    line_end = text.find("\n", _last_leaf_end(value))
    return _Edit(start, len(text) if line_end == -1 else line_end + 1, "")


def remove_settings(text: str, paths: Iterable[tuple[str, ...]]) -> str:
    """Take each `(top-level key, [nested key...])` out of `config:`, touching no other byte.

    A path that is not in the file is left alone (there is nothing to remove).
    """
    for path in paths:
        root = yaml.compose(text)
        found = _find(root, "config") if isinstance(root, yaml.MappingNode) else None
        if found is None or not isinstance(found[1], yaml.MappingNode):
            raise Refused("the stack file has no `config:` mapping")
        mapping: yaml.Node = found[1]
        for depth, key in enumerate(path):
            if not isinstance(mapping, yaml.MappingNode):
                break
            index = next((i for i, (k, _) in enumerate(mapping.value) if getattr(k, "value", None) == key), None)
            if index is None:
                break
            if depth == len(path) - 1:
                edit = _removal(text, mapping, index, ".".join(path))
                text = text[: edit.start] + text[edit.end :]
                break
            mapping = mapping.value[index][1]
    return text


def effective_config(document: Any) -> Any:
    """The `config:` mapping with shorthand scalars spelled out, so both spellings compare equal."""
    config = json.loads(json.dumps((document or {}).get("config") or {}, default=str))
    for top, short in SCALAR_SHORTHANDS.items():
        if isinstance(config.get(top), str):
            config[top] = {short: config[top]}
    return config


def expected_config(
    document: Any, settings: Mapping[tuple[str, ...], str], removed: Iterable[tuple[str, ...]] = ()
) -> Any:
    """The effective `config:` of `document` once `settings` (path -> value) are written and `removed` taken out."""
    config = effective_config(document)
    for path, value in settings.items():
        parent = config
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        parent[path[-1]] = value
    for path in removed:
        parent = config
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return config
