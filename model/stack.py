"""Reading a stack's configuration: from the engine (`pulumi up`) or from a stack file (tests, offline tools).

The raw `kubeadm-ha:` keys are parsed once, at the edge, into the frozen models of model/config.py, then
checked against each other (model/rules.py) and against the running cluster (model/running.py).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

import pulumi
import yaml
from pydantic import ValidationError

from model.config import CONFIG_NAMESPACE, ClusterConfig
from model.previous import NEW_STACK, PreviousDeployment, read_previous_deployment
from model.rules import ConfigError, Problem, cross_field_problems, promotion_problems
from model.running import change_problems, end_of_life_problems

_TOP_LEVEL_KEYS = {field.alias or name for name, field in ClusterConfig.model_fields.items()}


def parse_config(
    raw: Mapping[str, Any],
    *,
    stack: str,
    previous: PreviousDeployment = NEW_STACK,
    today: datetime.date | None = None,
) -> ClusterConfig:
    """Validate `raw` (the `kubeadm-ha:` keys without prefix) and return the typed config.

    Raises ConfigError listing every problem: field rules first, then the
    cross-field rules (those only run once every field is individually valid).
    """
    data = dict(raw)
    data.setdefault("clusterName", stack)
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError([_problem_from_pydantic(item) for item in error.errors()]) from None
    problems = (
        cross_field_problems(config)
        + promotion_problems(config, stack)
        + change_problems(config, previous)
        + end_of_life_problems(config, previous, today or datetime.date.today())
    )
    if problems:
        raise ConfigError(problems)
    return config


def load_stack_config(stack: str, previous: PreviousDeployment | None = None) -> ClusterConfig:
    """Read the `kubeadm-ha:` namespace of the current stack's configuration and check it against the last run.

    `previous` is the last run's outputs, read here when not given.
    """
    namespace = pulumi.Config(CONFIG_NAMESPACE)
    raw: dict[str, Any] = {}
    for key in sorted(_TOP_LEVEL_KEYS):
        text = namespace.get(key)
        if text is None:
            continue
        raw[key] = _decode_config_value(text)
    return parse_config(raw, stack=stack, previous=previous if previous is not None else read_previous_deployment())


def _decode_config_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string value such as clusterName or image


def _problem_from_pydantic(item: Mapping[str, Any]) -> Problem:
    path = ".".join(str(part) for part in item["loc"]) or "(root)"
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key (check the spelling against the README)"
    elif item["type"] in {"value_error", "missing"} or "input" not in item:
        pass  # our own rules already quote the offending value
    else:
        message = f"{item['input']!r}: {message}"
    return Problem(path, message)


def config_from_stack_file(path: str, stack: str) -> ClusterConfig:
    """Parse a `Pulumi.<stack>.yaml` file directly (tests and offline tools; the program uses `load_stack_config`)."""
    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    prefix = CONFIG_NAMESPACE + ":"
    raw = {
        key.removeprefix(prefix): value
        for key, value in (document.get("config") or {}).items()
        if key.startswith(prefix)
    }
    return parse_config(raw, stack=stack)
