"""The promotion gate: a stack changes only to the release (and program revision) its source stack runs.

`promotion: {from: dev}` in Pulumi.staging.yaml makes every preview and up of staging read dev's outputs
through a `pulumi.StackReference` and refuse, before any cluster resource is registered, a *change* of
release or program digest to one dev does not run. A run that re-applies the release and program staging
already runs (its own last outputs, model/previous.py) is no promotion and passes whatever dev runs now:
that is the periodic run certificate renewal, replacing a dead node and scaling depend on.
`gate: off` with a reason lets anything through, with a warning on every run.

The decision itself (`judge`) is a pure function of what the stack and its source exported;
`enforce_promotion_gate` is the wiring that reads those outputs inside the running program.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import pulumi
from pulumi.runtime.sync_await import _sync_await

from model.config import ClusterConfig, PromotionConfig
from model.previous import READ_STACK_OUTPUTS
from model.release import (
    PROGRAM_DIGEST_KEY,
    PROGRAM_DIGEST_OUTPUT,
    RELEASE_OUTPUT,
    Difference,
    deployment_differences,
    has_deployed,
)

SOURCE_REFERENCE = "promotion-source"


class _UnknownOutputs:
    def __repr__(self) -> str:
        return "UNKNOWN_OUTPUTS"


# The source's outputs could not be known (an engine or mock that leaves a read unresolved in preview).
UNKNOWN_OUTPUTS: Final = _UnknownOutputs()


@dataclass(frozen=True)
class SourceMissing:
    """The source stack could not be read: it does not exist (or the backend would not say)."""

    detail: str = ""


class PromotionRefused(pulumi.RunError):
    """The release this stack would deploy has not run in its promotion source."""


@dataclass(frozen=True)
class Refusal:
    stack: str
    source: str
    reasons: tuple[str, ...]
    advice: str
    # What the run would change in what the stack runs (empty: the stack has no finished deployment yet).
    changes: tuple[str, ...] = ()

    def message(self) -> str:
        listing = "\n".join(f"  - {reason}" for reason in self.reasons)
        changing = ""
        if self.changes:
            changing = (
                f"This run changes what {self.stack} runs ({'; '.join(self.changes)}), and a change must be what "
                f"{self.source} runs.\n"
            )
        return (
            f"promotion gate (promotion.from: {self.source}): stack {self.stack} refuses to deploy a release "
            f"{self.source} has not deployed:\n{listing}\n{changing}{self.advice}"
        )


def _override_hint(stack: str, source: str) -> str:
    return (
        f'(Only in an emergency: promotion: {{from: {source}, gate: off, reason: "..."}} in Pulumi.{stack}.yaml '
        "lets it through, with a warning on every run.)"
    )


def reapplied_changes(
    wanted_release: Mapping[str, Any], wanted_digest: str, deployed: Mapping[str, Any]
) -> list[Difference] | None:
    """What deploying `wanted_release` by `wanted_digest` changes in the stack whose last outputs are `deployed`.

    None when the stack has no finished deployment to compare with (a new stack, or a first `up` that failed:
    the release is exported only once every step has run), so everything it deploys is a change. An empty
    list is a re-apply: the same release by the same program, whatever else in the config changed.
    """
    if not has_deployed(deployed):
        return None
    return deployment_differences(wanted_release, wanted_digest, deployed)


def _back_to_what_runs(stack: str, changes: list[Difference]) -> str:
    """How to re-apply what `stack` runs instead of changing it: the routine run the gate always lets through."""
    ways = []
    if any(change.key == PROGRAM_DIGEST_KEY for change in changes):
        ways.append(
            f"run from the program revision {stack} runs (python -m tools.promote {stack} --find-revision names it)"
        )
    if any(change.key != PROGRAM_DIGEST_KEY for change in changes):
        ways.append(f"put back the release keys it runs in Pulumi.{stack}.yaml")
    return f"To re-apply what {stack} runs instead: {' and '.join(ways)}."


def judge(
    *,
    stack: str,
    source: str,
    wanted_release: Mapping[str, Any],
    wanted_digest: str,
    deployed: Mapping[str, Any],
    source_outputs: Mapping[str, Any] | _UnknownOutputs | SourceMissing,
) -> Refusal | None:
    """Whether `stack` may deploy `wanted_release` by program `wanted_digest`. None: the gate lets it through.

    `deployed` is the stack's own last outputs (empty for a new stack). A run that deploys exactly the release
    and program the stack already runs passes, whatever the source runs: only a change has to be what the
    source runs. `source_outputs` is SourceMissing when the source stack could not be read, UNKNOWN_OUTPUTS when
    its outputs are not known values.
    """
    changes = reapplied_changes(wanted_release, wanted_digest, deployed)
    if changes == []:
        return None
    hint = _override_hint(stack, source)
    if changes:
        hint = f"{_back_to_what_runs(stack, changes)} {hint}"
    changed = tuple(change.describe(f"{stack} would deploy", f"{stack} runs") for change in changes or ())
    if isinstance(source_outputs, SourceMissing):
        detail = f" ({source_outputs.detail})" if source_outputs.detail else ""
        return Refusal(
            stack,
            source,
            (f"stack {source} does not exist in this backend{detail}, so nothing has run there",),
            f"Create and deploy it first (pulumi stack init {source}; pulumi up --stack {source}). {hint}",
            changed,
        )
    if isinstance(source_outputs, _UnknownOutputs):
        return Refusal(
            stack,
            source,
            (f"the outputs of stack {source} are not known in this run, so what it runs cannot be compared",),
            f"Run again once {source}'s outputs can be read (pulumi stack output --stack {source}). {hint}",
            changed,
        )
    if not has_deployed(source_outputs):
        return Refusal(
            stack,
            source,
            (f"stack {source} has never finished a deployment of this program (it exports no release)",),
            f"Deploy it first: pulumi up --stack {source}. {hint}",
            changed,
        )
    differences = deployment_differences(wanted_release, wanted_digest, source_outputs)
    if not differences:
        return None
    return Refusal(
        stack,
        source,
        tuple(difference.describe(f"{stack} would deploy", f"{source} runs") for difference in differences),
        f"Deploy this change to {source} first (pulumi up --stack {source}), or, to deploy what {source} runs, "
        f"promote it: python -m tools.promote {stack} --from {source}. {hint}",
        changed,
    )


def promotion_output(promotion: PromotionConfig) -> dict[str, str]:
    """What the stack exports about its gate, so an override is visible in `pulumi stack output`."""
    exported = {"from": promotion.source, "gate": promotion.gate}
    if promotion.gate == "off" and promotion.reason:
        exported["reason"] = promotion.reason
    return exported


def qualified_stack_name(source: str) -> str:
    """`organization/project/stack`, the form both the local backend and Pulumi Cloud accept."""
    return f"{pulumi.get_organization()}/{pulumi.get_project()}/{source}"


def enforce_promotion_gate(
    config: ClusterConfig, *, stack: str, release: Mapping[str, Any], digest: str, deployed: Mapping[str, Any]
) -> dict[str, str] | None:
    """Refuse, with PromotionRefused, to deploy a release the promotion source does not run.

    `deployed` is this stack's own last outputs, the same read the program's other checks use
    (model/previous.py). Call before any cluster resource is registered. Returns what to export as
    `promotion` (None: no gate).
    """
    promotion = config.promotion
    if promotion is None:
        return None
    if promotion.gate == "off":
        pulumi.log.warn(
            f"promotion gate OFF for stack {stack} (promotion.from: {promotion.source}): this run may deploy a "
            f"release {promotion.source} has not run. Reason given: {promotion.reason}"
        )
        return promotion_output(promotion)
    # Read even for a re-apply, so the StackReference stays in the state and is not deleted and re-created
    # between routine runs and promotions.
    source_outputs = _read_source_outputs(qualified_stack_name(promotion.source))
    refusal = judge(
        stack=stack,
        source=promotion.source,
        wanted_release=release,
        wanted_digest=digest,
        deployed=deployed,
        source_outputs=source_outputs,
    )
    if refusal is not None:
        raise PromotionRefused(refusal.message())
    note = reapply_note(stack=stack, source=promotion.source, deployed=deployed, source_outputs=source_outputs)
    if note is not None:
        pulumi.log.info(note)
    return promotion_output(promotion)


def reapply_note(
    *,
    stack: str,
    source: str,
    deployed: Mapping[str, Any],
    source_outputs: Mapping[str, Any] | _UnknownOutputs | SourceMissing,
) -> str | None:
    """For a run the gate let through: if it is a re-apply and the source runs something else, say so.

    None when the source runs exactly what the stack runs (nothing to tell) or the run was a promotion.
    """
    if not has_deployed(deployed):
        return None
    head = (
        f"promotion gate: stack {stack} re-applies the release and program it runs, so it passes whatever {source} runs"
    )
    if isinstance(source_outputs, SourceMissing):
        return f"{head}; {source} could not be read ({source_outputs.detail or 'no detail'})."
    if isinstance(source_outputs, _UnknownOutputs) or not has_deployed(source_outputs):
        return f"{head}; {source} has no known deployment to compare with."
    release = deployed[RELEASE_OUTPUT]
    ahead = deployment_differences(release, str(deployed[PROGRAM_DIGEST_OUTPUT]), source_outputs)
    if not ahead:
        return None
    listing = "; ".join(difference.describe(f"{stack} runs", f"{source} runs") for difference in ahead)
    return (
        f"{head}; {source} runs another ({listing}). To move {stack} on to it: "
        f"python -m tools.promote {stack} --from {source}."
    )


def _read_source_outputs(name: str) -> Mapping[str, Any] | _UnknownOutputs | SourceMissing:
    """The source stack's outputs, read before any cluster resource exists.

    Why two reads. The engine's `pulumi:pulumi:readStackOutputs` invoke is synchronous and raises into the
    program, so a missing stack becomes our clear refusal here. A failed StackReference read, by contrast, is
    an RPC failure the SDK records and re-raises once the program ends, replacing whatever we raised with
    the engine's bare "unknown stack". Once the stack is known to exist, the StackReference is the read the
    gate decides on: it is recorded in this stack's state as the one resource registered before the check.

    Why `_sync_await`. The StackReference's outputs are an Output; the program has to know them *now*, before
    it registers the cluster, not in an apply that runs after everything is registered. `_sync_await` pumps
    the event loop until the read completes; it is what the SDK's own synchronous `pulumi.runtime.invoke`
    (used for the probe, and by model/previous.py) is built on, and it works the same under the engine
    and under the mock monitor (tools/offline/monitor.py). Preview reads stack references like `up` does, so the
    decision is the same in both; an output that still comes back unknown is refused, never guessed.
    """
    try:
        pulumi.runtime.invoke(READ_STACK_OUTPUTS, {"name": name})
    except Exception as error:  # the engine reports a missing stack as a plain invoke error
        return SourceMissing(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    reference = pulumi.StackReference(SOURCE_REFERENCE, stack_name=name)
    return _sync_await(_known_outputs(reference))


async def _known_outputs(reference: pulumi.StackReference) -> Mapping[str, Any] | _UnknownOutputs:
    if not await reference.outputs.is_known():
        return UNKNOWN_OUTPUTS
    outputs = await reference.outputs.future()
    return dict(outputs or {})
