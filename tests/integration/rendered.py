"""Every script the program can send to a node, rendered for every stack file, for the static checks.

To check a new kind of script, add its generator to `all_rendered_scripts`.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.addressing import NodePlan, plan_addresses
from model.config import ClusterConfig
from render.node_prep import preparation_for
from tests.integration.tool_scripts import operator_tool_scripts
from tests.stacks import ALL_STACKS, STACK_FILES, evaluated, stack_config
from tools.graph import REMOTE_STEP
from tools.plan import script_of

LOCAL_STEP = "command:local:Command"


def stack_nodes() -> Iterator[tuple[str, ClusterConfig, NodePlan]]:
    """(stack, config, node) for every planned node of every stack file."""
    for stack in STACK_FILES:
        config = stack_config(stack)
        for node in plan_addresses(config).nodes:
            yield stack, config, node


def node_preparation_scripts() -> Iterator[tuple[str, str]]:
    for stack, config, node in stack_nodes():
        script = preparation_for(node.role, node.hostname, config.kubernetes)
        yield f"{stack}/{node.hostname}/{script.step}", script.render()


def remote_step_scripts() -> Iterator[tuple[str, str]]:
    """Every remote step the program registers (create and delete), for every stack and extra shape."""
    for stack in ALL_STACKS:
        for step in evaluated(stack).by_type(REMOTE_STEP):
            if step.inputs.get("create"):  # a step that exists for its delete has none
                yield f"{stack}/{step.name}", script_of(step)
            if step.inputs.get("delete"):
                yield f"{stack}/{step.name}/delete", script_of(step, "delete")


def local_step_scripts() -> Iterator[tuple[str, str]]:
    """Every step the machine running Pulumi runs itself (the base image fetch), for every stack and shape."""
    for stack in ALL_STACKS:
        for step in evaluated(stack).by_type(LOCAL_STEP):
            for phase in ("create", "delete"):
                if step.inputs.get(phase):
                    yield f"{stack}/{step.name}/{phase}", step.inputs[phase]


def all_rendered_scripts() -> list[tuple[str, str]]:
    """(unique name, script text) pairs: every script `bash -n` and shellcheck must accept."""
    scripts: list[tuple[str, str]] = []
    scripts.extend(node_preparation_scripts())
    scripts.extend(remote_step_scripts())
    scripts.extend(local_step_scripts())
    scripts.extend(operator_tool_scripts())
    names = [name for name, _ in scripts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AssertionError(f"script names must be unique: {duplicates}")
    return scripts
