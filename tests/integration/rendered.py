"""Every script the program can send to a node, rendered for every stack file, for the static checks.

To check a new kind of script, add its generator to `all_rendered_scripts`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from components.addressing import NodePlan, plan_addresses
from components.config import ClusterConfig, config_from_stack_file
from components.node_prep import preparation_for

REPO_ROOT = Path(__file__).resolve().parents[2]
STACKS = ("dev", "staging", "prod")


def stack_config(stack: str) -> ClusterConfig:
    return config_from_stack_file(str(REPO_ROOT / f"Pulumi.{stack}.yaml"), stack)


def stack_nodes() -> Iterator[tuple[str, ClusterConfig, NodePlan]]:
    """(stack, config, node) for every planned node of every stack file."""
    for stack in STACKS:
        config = stack_config(stack)
        for node in plan_addresses(config).nodes:
            yield stack, config, node


def node_preparation_scripts() -> Iterator[tuple[str, str]]:
    for stack, config, node in stack_nodes():
        script = preparation_for(node.role, node.hostname, config)
        yield f"{stack}/{node.hostname}/{script.step}", script.render()


def all_rendered_scripts() -> list[tuple[str, str]]:
    """(unique name, script text) pairs: every script `bash -n` and shellcheck must accept."""
    scripts: list[tuple[str, str]] = []
    scripts.extend(node_preparation_scripts())
    # Remote steps (kubeadm init/join, PKI placement, load-balancer configuration) are added here.
    names = [name for name, _ in scripts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AssertionError(f"script names must be unique: {duplicates}")
    return scripts
