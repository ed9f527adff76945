"""Stack configuration: the project name, ``Pulumi.<stack>.yaml`` and the engine's encoding of it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

DEFAULT_PROJECT: Final = "kubeadm-ha"


# --------------------------------------------------------------------------- configuration


def project_name(project_dir: Path) -> str:
    """The project name from ``Pulumi.yaml``, defaulting to :data:`DEFAULT_PROJECT`."""
    path = project_dir / "Pulumi.yaml"
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            return data["name"]
    return DEFAULT_PROJECT


def load_stack_config(project_dir: Path, stack: str) -> dict[str, Any]:
    """The ``config:`` mapping of ``Pulumi.<stack>.yaml``."""
    path = project_dir / f"Pulumi.{stack}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a mapping")
    return config


def engine_config(config: Mapping[str, Any], project: str) -> tuple[dict[str, str], list[str]]:
    """Encode stack configuration the way the engine hands it to a program.

    Strings pass as-is and everything else as JSON (``Config.get_object`` parses it).
    Keys without a namespace belong to the project. ``secure:`` values cannot be
    decrypted offline; they become a placeholder and the key is marked secret.
    """
    values: dict[str, str] = {}
    secret_keys: list[str] = []
    for raw_key, raw_value in config.items():
        key = raw_key if ":" in raw_key else f"{project}:{raw_key}"
        value, secret = _without_secure(raw_value, key)
        values[key] = value if isinstance(value, str) else json.dumps(value, default=str)
        if secret:
            secret_keys.append(key)
    return values, secret_keys


def _without_secure(value: Any, key: str) -> tuple[Any, bool]:
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return f"offline-secret:{key}", True
        items = {k: _without_secure(v, key) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(s for _, s in items.values())
    if isinstance(value, list):
        decoded = [_without_secure(v, key) for v in value]
        return [v for v, _ in decoded], any(s for _, s in decoded)
    return value, False
