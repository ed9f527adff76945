"""Offline runtime for the kubeadm-ha Pulumi program.

Evaluates ``__main__.py`` for a stack under Pulumi's mock runtime (no CLI, no
provider plugins) and returns everything the program registered. By concern:

- :mod:`tools.offline.runtime`: running the program (:func:`evaluate`, :data:`REPO_ROOT`).
- :mod:`tools.offline.results`: what an evaluation returns (:class:`Evaluation`, :data:`UNKNOWN`).
- :mod:`tools.offline.monitor`: the mock monitor and wire decoding (:class:`OfflineMocks`).
- :mod:`tools.offline.providers`: provider stand-ins, by resource type; the pulumi-tls ones
  in :mod:`tools.offline.keys` and :mod:`tools.offline.certificates`.
- :mod:`tools.offline.stack_config`: ``Pulumi.<stack>.yaml`` and the engine's encoding of it.

Typical use::

    from tools.offline import evaluate

    ev = evaluate("dev")
    ca = ev.named("cluster-ca")
    assert ev.depends_on("kubeadm-init", ca)
"""

from tools.offline.certificates import NOT_BEFORE
from tools.offline.monitor import OfflineMocks, RecordingMonitor
from tools.offline.results import (
    STACK_TYPE,
    UNKNOWN,
    Evaluation,
    LogMessage,
    OutputValue,
    Read,
    Registration,
    ResourceRef,
    StackOutputs,
)
from tools.offline.runtime import REPO_ROOT, evaluate, evaluation_of_failure, stacks_as_their_files_say
from tools.offline.stack_config import DEFAULT_PROJECT, engine_config, load_stack_config, project_name

__all__ = [
    "DEFAULT_PROJECT",
    "NOT_BEFORE",
    "REPO_ROOT",
    "STACK_TYPE",
    "UNKNOWN",
    "Evaluation",
    "LogMessage",
    "OfflineMocks",
    "OutputValue",
    "Read",
    "RecordingMonitor",
    "Registration",
    "ResourceRef",
    "StackOutputs",
    "engine_config",
    "evaluate",
    "evaluation_of_failure",
    "load_stack_config",
    "project_name",
    "stacks_as_their_files_say",
]
