"""Every kubeadm document the program sends, taken from its steps' stdin bundles under the offline runtime.

A stack is evaluated as written, and again with `kubernetes.version` set to each version the tests have a
kubeadm for, so the same shapes are checked against the oldest supported and the default kubeadm.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from render.kubeadm import INIT_CONFIG_PATH, JOIN_CONFIG_PATH
from tests.stacks import ALL_STACKS, EXTRA_SHAPES, REPO_ROOT, evaluated, extra_raw_config
from tools.graph import REMOTE_STEP
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import bundle_by_path, decode_bundle

KUBEADM_GROUP = "kubeadm.k8s.io/"


@dataclass(frozen=True)
class DocumentFile:
    """One file of kubeadm documents as one step installs it."""

    stack: str
    step: str
    path: str
    content: str

    @property
    def label(self) -> str:
        return f"{self.step}:{self.path}"


@functools.cache
def evaluated_at(stack: str, kubernetes_version: str | None, changes: str = "") -> Evaluation:
    """`stack` as written (version None) or with `kubernetes.version` set to `kubernetes_version`; `changes`: a
    JSON object of more `kubeadm-ha:` keys (without the prefix) set over the stack's, e.g. a changed setting."""
    if kubernetes_version is None and not changes:
        return evaluated(stack)
    if stack in EXTRA_SHAPES:
        config: dict[str, Any] = {f"kubeadm-ha:{key}": value for key, value in extra_raw_config(stack).items()}
    else:
        config = dict(load_stack_config(REPO_ROOT, stack))
        # The promotion gate compares a stack's release with its source stack's; a version or setting changed
        # here is a question for kubeadm only, not a release to promote.
        config.pop("kubeadm-ha:promotion", None)
    if kubernetes_version is not None:
        kubernetes = dict(config.get("kubeadm-ha:kubernetes") or {})
        kubernetes["version"] = kubernetes_version
        config["kubeadm-ha:kubernetes"] = kubernetes
    for key, value in json.loads(changes or "{}").items():
        config[f"kubeadm-ha:{key}"] = value
    return evaluate(stack, project_dir=REPO_ROOT, config=config)


def document_files(evaluation: Evaluation) -> list[DocumentFile]:
    """Every file holding a kubeadm document that any step of `evaluation` installs (create side)."""
    found = []
    for step in evaluation.by_type(REMOTE_STEP):
        for planned in decode_bundle(step.inputs.get("stdin") or ""):
            if f"apiVersion: {KUBEADM_GROUP}" in planned.content:
                found.append(DocumentFile(evaluation.stack, step.name, planned.path, planned.content))
    return found


def step_files(evaluation: Evaluation, step: str) -> dict[str, tuple[int, str]]:
    return bundle_by_path(evaluation.named(step).inputs["stdin"])


def init_step(evaluation: Evaluation) -> str:
    (step,) = [s.name for s in evaluation.by_type(REMOTE_STEP) if s.name.endswith("-kubeadm-init")]
    return step


def init_documents(evaluation: Evaluation) -> str:
    return step_files(evaluation, init_step(evaluation))[INIT_CONFIG_PATH][1]


def join_documents(evaluation: Evaluation, hostname: str) -> str:
    return step_files(evaluation, f"{hostname}-kubeadm-join")[JOIN_CONFIG_PATH][1]


__all__ = [
    "ALL_STACKS",
    "DocumentFile",
    "document_files",
    "evaluated_at",
    "init_documents",
    "init_step",
    "join_documents",
    "step_files",
]
