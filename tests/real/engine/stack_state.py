"""A stack's last deployment, put into a real backend with `pulumi stack import` instead of deployed.

The promotion gate reads its source's outputs with a `pulumi.StackReference` (components/promotion.py), and
every stack reads its own last outputs (model/previous.py). What a stack exports after a successful `pulumi up`
is what the offline evaluation of the same stack file and checkout returns (tools.offline: `release`,
`programDigest`, `nodes`, ... as tests/program/test_promotion.py builds them), so the engine tests build that,
change what a case needs (a release key, the digest), and import it as the root stack resource's outputs.
Nothing real is deployed.

The deployment starts from `pulumi stack export` of the stack just made by `pulumi stack init` (its manifest
and secrets provider, the passphrase's salt), with the root `pulumi:pulumi:Stack` resource added. Secret outputs
(kubeconfig, the SSH private key) go in as secret values in `plaintext` form, which `pulumi stack import`
accepts and encrypts with the stack's own secrets provider (pulumi v3.259.0
pkg/resource/stack/deployment.go, DeserializePropertyValue: "exactly one of `ciphertext` or `plaintext`").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.release import PROGRAM_DIGEST_OUTPUT, RELEASE_OUTPUT
from tests.real.engine.cli import UserSession
from tools.offline import DEFAULT_PROJECT, UNKNOWN, OutputValue, evaluate

# sdk/go/common/resource/sig/sig.go at v3.259.0: the key marking a special value, and the secret's signature.
SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


def deployed_outputs(stack: str, project_dir: Path, **evaluation: Any) -> dict[str, OutputValue]:
    """What `pulumi up` of `stack` (its stack file in `project_dir`, this checkout) leaves as outputs."""
    outputs = evaluate(stack, project_dir=project_dir, preview=False, **evaluation).outputs
    unknown = [name for name, output in outputs.items() if not output.known or output.value is UNKNOWN]
    assert not unknown, f"an up of {stack} left outputs unknown: {unknown}"
    return dict(outputs)


def changed(
    outputs: Mapping[str, OutputValue], *, release: Mapping[str, str] | None = None, digest: str | None = None
) -> dict[str, OutputValue]:
    """`outputs` with release keys (and the program digest) replaced: a source that runs something else."""
    result = dict(outputs)
    if release:
        old = result[RELEASE_OUTPUT]
        result[RELEASE_OUTPUT] = OutputValue({**old.value, **release}, old.secret, True)
    if digest is not None:
        result[PROGRAM_DIGEST_OUTPUT] = OutputValue(digest, False, True)
    return result


def serialized(output: OutputValue) -> Any:
    if output.secret:
        return {SIG_KEY: SECRET_SIG, "plaintext": json.dumps(output.value)}
    return output.value


def root_resource(stack: str, outputs: Mapping[str, OutputValue], project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    return {
        "urn": f"urn:pulumi:{stack}::{project}::pulumi:pulumi:Stack::{project}-{stack}",
        "custom": False,
        "type": "pulumi:pulumi:Stack",
        "outputs": {name: serialized(output) for name, output in outputs.items()},
    }


def import_outputs(user: UserSession, stack: str, outputs: Mapping[str, OutputValue]) -> None:
    """Make `stack` (created if missing) hold exactly a root stack resource with `outputs`: its last `up`."""
    listed = user.pulumi("stack", "ls", "--json")
    assert listed.returncode == 0, listed.describe()
    if stack not in {entry["name"] for entry in json.loads(listed.stdout or "[]")}:
        created = user.pulumi("stack", "init", stack)
        assert created.returncode == 0, created.describe()
    exported = user.pulumi("stack", "export", "--stack", stack)
    assert exported.returncode == 0, exported.describe()
    document = json.loads(exported.stdout)
    document["deployment"]["resources"] = [root_resource(stack, outputs)]
    path = user.base / f"import-{stack}.json"  # outside the project: no stray file for the program to see
    path.write_text(json.dumps(document))
    try:
        imported = user.pulumi("stack", "import", "--stack", stack, "--file", str(path))
        assert imported.returncode == 0, imported.describe()
    finally:
        path.unlink()  # it holds the secret outputs in plaintext
    read = user.pulumi("stack", "output", "--stack", stack, "--json")
    assert read.returncode == 0, read.describe()
    shown = json.loads(read.stdout)
    assert shown[RELEASE_OUTPUT] == outputs[RELEASE_OUTPUT].value, (shown, outputs[RELEASE_OUTPUT])
    assert shown[PROGRAM_DIGEST_OUTPUT] == outputs[PROGRAM_DIGEST_OUTPUT].value
    assert all(shown[name] == "[secret]" for name, output in outputs.items() if output.secret), "secrets in clear"
