"""The stacks every check runs against: the stack files, plus extra shapes at the edges of the config space.

Each is evaluated once per test session through the offline runtime, so checks
look at what the program itself would send, not at a re-rendering of it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from model.config import ClusterConfig
from model.stack import config_from_stack_file, parse_config
from tools.offline import Evaluation, evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every Pulumi.<stack>.yaml in the repository: prod-multihost is the bridged, three-hypervisor example.
STACK_FILES = ("dev", "staging", "prod", "prod-multihost")
# name: (control planes, load balancers, workers)
EXTRA_SHAPES: dict[str, tuple[int, int, int]] = {
    "big": (5, 2, 20),
    "three-lb": (5, 3, 2),
    "single-lb": (3, 1, 2),
    "smallest": (1, 1, 0),
}
ALL_STACKS = (*STACK_FILES, *EXTRA_SHAPES)


def extra_raw_config(name: str) -> dict[str, Any]:
    """The `kubeadm-ha:` keys (without prefix) of an extra shape."""
    control_planes, load_balancers, workers = EXTRA_SHAPES[name]
    return {
        "network": {"cidr": "10.17.9.0/24"},
        "loadBalancer": {"replicas": load_balancers},
        "controlPlane": {"replicas": control_planes},
        "workers": {"replicas": workers},
    }


def stack_config(name: str) -> ClusterConfig:
    if name in STACK_FILES:
        return config_from_stack_file(str(REPO_ROOT / f"Pulumi.{name}.yaml"), name)
    return parse_config(extra_raw_config(name), stack=name)


@functools.cache
def evaluated(name: str) -> Evaluation:
    if name in STACK_FILES:
        return evaluate(name, project_dir=REPO_ROOT)
    config = {f"kubeadm-ha:{key}": value for key, value in extra_raw_config(name).items()}
    return evaluate(name, project_dir=REPO_ROOT, config=config)
