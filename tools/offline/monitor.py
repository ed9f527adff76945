"""The mock monitor: decodes what the program sends, records it, and answers like the providers would.

The mocks behave like the real providers where the program can observe it:
TLS resources return real, verifiable keys and certificates (deterministic, so
two evaluations are byte-identical), and ``preview=True`` reproduces a first
``pulumi preview`` of a new stack, in which computed outputs are unknown.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

import pulumi
from google.protobuf import struct_pb2
from pulumi.runtime import known_types, rpc
from pulumi.runtime.mocks import MockCallArgs, MockEngine, MockMonitor, MockResourceArgs

# The engine builtins the program reads its own state with, and the builtin Stash (model/previous.py says what
# each one does).
from model.previous import READ_STACK_OUTPUTS, READ_STACK_RESOURCE_OUTPUTS, STASH_TYPE
from tools.offline.providers import COMPUTED_OUTPUTS
from tools.offline.results import STACK_TYPE, UNKNOWN, LogMessage, OutputValue, Read, Registration, StackOutputs

_LOG = logging.getLogger(__name__)

STACK_REFERENCE_TYPE: Final = "pulumi:pulumi:StackReference"

# Wire-format markers, as defined by the Pulumi engine (sdk/go/common/resource/properties.go).
_SIG_KEY: Final = "4dabf18193072939515e22adb298388d"
_SECRET_SIG: Final = "1b47061264138c4ac30d75fd1eb44270"
_OUTPUT_VALUE_SIG: Final = "d0e6a833031e9bbcd3f4e8bde6ca49a4"
_UNKNOWN_WIRE: Final = rpc.UNKNOWN


# --------------------------------------------------------------------------- wire decoding


def _decode(value: Any) -> tuple[Any, bool, bool]:
    """Decode a protobuf property value into plain Python.

    Returns ``(value, contains_secret, contains_unknown)``. Decoding the raw
    struct (instead of ``rpc.deserialize_properties``) keeps the secret and
    unknown markers observable and never instantiates resource references.
    """
    if isinstance(value, struct_pb2.Struct):
        if _SIG_KEY in value.fields:
            signature = value[_SIG_KEY]
            if signature == _SECRET_SIG:
                if "value" not in value.fields:
                    return UNKNOWN, True, True
                inner, _, unknown = _decode(value["value"])
                return inner, True, unknown
            if signature == _OUTPUT_VALUE_SIG:
                secret = "secret" in value.fields and bool(value["secret"])
                if "value" not in value.fields:
                    return UNKNOWN, secret, True
                inner, inner_secret, unknown = _decode(value["value"])
                return inner, secret or inner_secret, unknown
        result: dict[str, Any] = {}
        any_secret = any_unknown = False
        for key, item in value.items():
            decoded, secret, unknown = _decode(item)
            any_secret |= secret
            any_unknown |= unknown
            # Mirror the SDK, which treats a null property as an absent one.
            if decoded is not None:
                result[key] = decoded
        return result, any_secret, any_unknown
    if isinstance(value, struct_pb2.ListValue):
        items: list[Any] = []
        any_secret = any_unknown = False
        for item in value:
            decoded, secret, unknown = _decode(item)
            any_secret |= secret
            any_unknown |= unknown
            items.append(decoded)
        return items, any_secret, any_unknown
    if isinstance(value, str) and value == _UNKNOWN_WIRE:
        return UNKNOWN, False, True
    return _number(value), False, False


def _number(value: Any) -> Any:
    # Protobuf carries every number as a double; integers read better as ints.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _decode_struct(struct: struct_pb2.Struct) -> tuple[dict[str, Any], frozenset[str]]:
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    for key, item in struct.items():
        decoded, secret, _ = _decode(item)
        if secret:
            secrets.add(key)
        if decoded is not None:
            values[key] = decoded
    return values, frozenset(secrets)


def _plain(value: Any) -> Any:
    """Unwrap SDK-side secrets and unknowns in mock inputs into plain values."""
    if rpc.is_rpc_secret(value):
        return _plain(value["value"])
    if known_types.is_unknown(value):
        return UNKNOWN
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return _number(value)


# --------------------------------------------------------------------------- monitor


# The URN being registered, so the mocks can derive per-resource material from it.
_CURRENT_URN: contextvars.ContextVar[str | None] = contextvars.ContextVar("offline_current_urn", default=None)


class RecordingMonitor(MockMonitor):
    """A mock resource monitor that records every registration and the stack outputs."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []
        self.stack_urn: str | None = None
        self.stack_outputs: dict[str, OutputValue] = {}
        self.reads: list[Read] = []
        self._lock = threading.Lock()

    def ReadResource(self, request: Any) -> Any:
        response = super().ReadResource(request)
        inputs, _ = _decode_struct(request.properties)
        outputs, _ = _decode_struct(response.properties)
        with self._lock:
            self.reads.append(
                Read(
                    urn=response.urn,
                    type=request.type,
                    name=request.name,
                    id=request.id or None,
                    inputs=inputs,
                    outputs=outputs,
                    registered_before=len(self.registrations),
                )
            )
        return response

    def RegisterResource(self, request: Any) -> Any:
        urn = self.make_urn(request.parent, request.type, request.name)
        token = _CURRENT_URN.set(urn)
        try:
            response = super().RegisterResource(request)
        finally:
            _CURRENT_URN.reset(token)
        inputs, secret_inputs = _decode_struct(request.object)
        outputs, _ = _decode_struct(response.object)
        registration = Registration(
            urn=response.urn,
            type=request.type,
            name=request.name,
            parent=request.parent or None,
            custom=bool(request.custom),
            id=response.id or None,
            inputs=inputs,
            outputs=outputs,
            secret_inputs=secret_inputs,
            # The SDK gathers dependencies concurrently, so their order carries no meaning: keep them sorted.
            dependencies=tuple(sorted(request.dependencies)),
            property_dependencies={
                key: tuple(sorted(deps.urns)) for key, deps in sorted(request.propertyDependencies.items())
            },
            additional_secret_outputs=tuple(request.additionalSecretOutputs),
            delete_before_replace=bool(request.deleteBeforeReplace),
            deleted_with=request.deletedWith or None,
            replace_on_changes=tuple(request.replaceOnChanges),
            ignore_changes=tuple(request.ignoreChanges),
            protect=bool(request.protect),
            retain_on_delete=bool(request.retainOnDelete),
            provider=request.provider or None,
        )
        with self._lock:
            if request.type == STACK_TYPE and not request.parent:
                self.stack_urn = response.urn
            self.registrations.append(registration)
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        if request.urn == self.stack_urn:
            outputs = {}
            for key, item in request.outputs.items():
                value, secret, unknown = _decode(item)
                outputs[key] = OutputValue(value=value, secret=secret, known=not unknown)
            with self._lock:
                self.stack_outputs = outputs
        return super().RegisterResourceOutputs(request)


class RecordingEngine(MockEngine):
    """Keeps the program's log messages for the caller instead of printing them."""

    _SEVERITIES: Final = {0: "debug", 1: "info", 2: "warning", 3: "error"}

    def __init__(self) -> None:
        super().__init__(_LOG)
        self.messages: list[LogMessage] = []

    def Log(self, request: Any) -> None:
        severity = self._SEVERITIES.get(int(request.severity), str(request.severity))
        _LOG.debug("program %s: %s", severity, request.message)
        # Debug messages are the SDK's own chatter about RPCs; keep the signal only.
        if severity != "debug":
            self.messages.append(LogMessage(severity, request.message, request.urn or None))


# --------------------------------------------------------------------------- mocks


def _stack_of(qualified: str) -> str:
    """`dev` for `organization/kubeadm-ha/dev` (and for `dev`)."""
    return qualified.rsplit("/", 1)[-1]


class OfflineMocks(pulumi.runtime.Mocks):
    """Provider stand-ins: real TLS material, echoed inputs for everything else.

    With ``preview=True`` every resource gets back exactly its inputs and no id,
    which the SDK resolves as unknown, as in a first preview of a new stack.
    Stack references are the exception, as with the engine, which reads them in
    preview too: they return the referenced stack's outputs from ``other_stacks``.
    """

    def __init__(
        self,
        *,
        preview: bool = False,
        previous_outputs: Mapping[str, Any] | None = None,
        stack: str | None = None,
        other_stacks: Callable[[str], StackOutputs] | None = None,
        previous_resources: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.preview = preview
        # Stand-in for the stack's state (the engine's last persisted snapshot): urn -> {"type", "outputs"}.
        # Unlike the outputs, the real engine writes it resource by resource, so it keeps what a failed run
        # created. What readStackResourceOutputs returns, and what a Stash that already exists keeps.
        # None: no resources (a stack just made by `pulumi stack init` answers that way with the real CLI).
        self.previous_resources = (
            None if previous_resources is None else {urn: dict(state) for urn, state in previous_resources.items()}
        )
        # What the engine's `pulumi:pulumi:readStackOutputs` returns: the stack's last deployed outputs.
        self.previous_outputs = dict(previous_outputs or {})
        # The stack being evaluated; readStackOutputs for any other name asks `other_stacks`.
        self.stack = stack
        self.other_stacks = other_stacks or (lambda _name: None)

    def _other_stack(self, qualified: str) -> StackOutputs:
        found = self.other_stacks(_stack_of(qualified))
        if found is None:
            # The engine's words for a stack reference to a missing stack.
            raise Exception(f"unknown stack {qualified!r}")
        return found

    def _stack_reference(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        name = str(args.inputs.get("name") or args.resource_id)
        outputs = self._other_stack(name)
        if outputs is UNKNOWN:
            # The wire form of an unknown value: the SDK resolves it as unknown, in preview and update alike.
            return name, {"name": name, "outputs": _UNKNOWN_WIRE, "secretOutputNames": _UNKNOWN_WIRE}
        assert isinstance(outputs, Mapping)
        return name, {"name": name, "outputs": dict(outputs), "secretOutputNames": []}

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        if args.typ == STACK_REFERENCE_TYPE:
            return self._stack_reference(args)
        # Returning the inputs keeps their secret and unknown markers on the outputs,
        # which is what the engine does for input-derived properties.
        state = dict(args.inputs)
        if self.preview or args.custom is False:
            return None, state
        identity = _CURRENT_URN.get() or f"{args.typ}::{args.name}"
        if args.typ == STASH_TYPE:
            # As the engine's builtin: a new stash outputs its input; an existing one keeps its first value.
            kept = ((self.previous_resources or {}).get(identity) or {}).get("outputs") or {}
            state["output"] = kept["output"] if "output" in kept else state.get("input")
        compute = COMPUTED_OUTPUTS.get(args.typ)
        if compute is not None:
            state.update(compute(identity, _plain(args.inputs)))
        # Reads and imports name an existing resource; keep its id.
        return args.resource_id or f"{args.name}-id", state

    def call(self, args: MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        if args.token == READ_STACK_OUTPUTS:
            name = str(args.args.get("name") or "")
            if self.stack is None or _stack_of(name) == self.stack:
                outputs: Mapping[str, Any] = self.previous_outputs
            else:
                found = self.other_stacks(_stack_of(name))
                if found is None:
                    # As the engine does: an invoke error raised into the program, not an RPC failure.
                    return {}, [("name", f"unknown stack {name!r}")]
                outputs = found if isinstance(found, Mapping) else {}
            return {"name": name, "outputs": dict(outputs), "secretOutputNames": []}, []
        if args.token == READ_STACK_RESOURCE_OUTPUTS:
            name = str(args.args.get("stackName") or "")
            if self.stack is not None and _stack_of(name) != self.stack:
                # Only this stack's own state is modelled.
                return {}, [("stackName", f"unknown stack {name!r}")]
            return {"name": name, "outputs": dict(self.previous_resources or {})}, []
        return {}, []
