"""pulumi-tls renewal for real (issue 19, part 5): the product's ClusterPki under the real engine and tls plugin.

What the product assumes (components/pki.py, components/certificates.py): every certificate it issues with
pulumi-tls (`LocallySignedCert`: the admin client certificate, external etcd's server, peer and client
certificates) is given `early_renewal_hours` (`certificates.renewBeforeDays` × 24), and a plain `pulumi up` run
inside that window re-issues it, with no refresh and no `--replace`; the steps that carry the certificate (its
digest in the step's command, the PEM in its secret stdin) then differ, so they run again and place it. Outside
the window a `pulumi up` leaves it alone (no-op).

pulumi-tls 5.3.0 is a plugin-framework bridge (provider/resources.go: `pf.ShimProvider`) over
terraform-provider-tls, whose `ModifyPlan` marks a certificate whose `validity_end_time - early_renewal_hours`
has passed as `ready_for_renewal`, a RequiresReplace attribute (internal/provider/common_cert.go,
`modifyPlanIfCertificateReadyForRenewal`). The bridge's Diff runs that plan, so the engine itself (not a refresh)
should see the renewal; pulumi/pulumi-tls#39 reports that older, SDKv2-based releases did not. This test is the
judge: the real CLI, language host, tls 5.3.0 and command 1.2.1 plugins, nothing downloaded.

The program is the product's own `ClusterPki` (components/pki.py, imported from the checkout) and a step shaped
like the product's (`components.remote.run_step`): the certificate's digest in the command, certificate and key
in a secret stdin, nothing printed. A command.local.Command stands in for the remote one (no SSH here); the
update semantics are the same provider's (pulumi-command v1.2.1: an update with no `update` command runs
`create` again). The step writes the certificate it received and appends a line per run to files in the test's
directory, so a re-run is seen on the "node", not only in the engine's account.

Two stacks of one project: `due` gives ClusterPki an early renewal longer than the admin certificate's one-year
validity (9000 h > 8760 h), so the certificate is inside its window from the moment it is issued; `calm` uses the
product's default (30 days). The window is in whole hours (the provider's `early_renewal_hours` is an integer),
so a certificate cannot be made to enter it by waiting a test-sized time.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.pki import CLIENT_VALIDITY_HOURS, LEAF_EARLY_RENEWAL_HOURS
from model.config import CertificatesConfig
from tests.real.engine import plugins
from tests.real.engine.scratch import ScratchProject
from tests.real.engine.toolchain import ROOT

pytestmark = pytest.mark.real

TIMEOUT_SECONDS = 300  # one CLI command; 5-20 s measured
DUE_HOURS = CLIENT_VALIDITY_HOURS + 240  # inside the window from issue on
CERT_URN_SUFFIX = "tls:index/locallySignedCert:LocallySignedCert::admin-client-cert"
STEP_URN_SUFFIX = "command:local:Command::place-admin-cert"

PROGRAM = """\
import hashlib
import sys

sys.path.insert(0, {root!r})
import pulumi
import pulumi_command as command

from components.pki import ClusterPki, ClusterPkiArgs
from components.remote import secret

config = pulumi.Config()
out = config.require("outDir")
pki = ClusterPki(
    "pki",
    ClusterPkiArgs(cluster_name="renewal", hostnames=[], early_renewal_hours=config.require_int("earlyRenewalHours")),
)
cert = pki.admin_cert


def script(pem: str) -> str:
    # As a product step: the public digest in the command, so a new certificate changes the command.
    digest = hashlib.sha256(pem.encode()).hexdigest()
    return (
        f"set -eu; umask 077; wanted={{digest}}; "
        f"sed -n '/BEGIN CERTIFICATE/,/END CERTIFICATE/p' > {{out}}/admin.crt; "
        f"echo \\"$wanted\\" >> {{out}}/runs"
    )


step = command.local.Command(
    "place-admin-cert",
    create=cert.cert_pem.apply(script),
    stdin=secret(pulumi.Output.all(cert.cert_pem, pki.admin_key.private_key_pem).apply(lambda p: p[0] + p[1])),
    interpreter=["/bin/bash", "-c"],
    logging=command.local.Logging.NONE,
    add_previous_output_in_env=False,
    opts=pulumi.ResourceOptions(additional_secret_outputs=["stdout", "stderr"]),
)
pulumi.export("certPem", cert.cert_pem)
pulumi.export("validityEndTime", cert.validity_end_time)
pulumi.export("readyForRenewal", cert.ready_for_renewal)
pulumi.export("stepId", step.id)
"""


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[ScratchProject]:
    plugins.cli_directory(), plugins.plugin_files()  # skip (fail under CI) without the toolchain
    project = ScratchProject(tmp_path / "renewal", name="renewal")
    try:
        yield project.setup(PROGRAM.format(root=str(ROOT)))
    finally:
        # Every process of every command was killed with its session (scratch.run_measured). The stacks hold
        # only tls keys and local commands writing into the project's directory: removing it undoes them.
        project.remove()


def stack(project: ScratchProject, name: str, early_renewal_hours: int) -> Path:
    out = project.base / f"out-{name}"  # removed with the project
    out.mkdir()
    project.must("stack", "init", name)
    project.must("config", "set", "--stack", name, "outDir", str(out))
    project.must("config", "set", "--stack", name, "earlyRenewalHours", str(early_renewal_hours))
    return out


def outputs(project: ScratchProject, name: str) -> dict[str, object]:
    found: dict[str, object] = json.loads(project.must("stack", "output", "--json", "--stack", name).stdout)
    return found


def serial(pem: str) -> str:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-serial"], input=pem, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def planned_ops(project: ScratchProject, name: str) -> dict[str, set[str]]:
    run = project.must("preview", "--stack", name, "--json", timeout=TIMEOUT_SECONDS)
    ops: dict[str, set[str]] = {}
    for step in json.loads(run.stdout).get("steps") or []:
        ops.setdefault(step["urn"].split("::", 2)[2], set()).add(step["op"])
    return ops


def by_suffix(ops: dict[str, set[str]], suffix: str) -> set[str]:
    return set().union(*(found for urn, found in ops.items() if urn.endswith(suffix)))


def test_a_certificate_inside_its_window_is_reissued_by_a_plain_up_and_its_step_runs_again(
    scratch: ScratchProject,
) -> None:
    out = stack(scratch, "due", DUE_HOURS)
    scratch.must("up", "--stack", "due", "--yes", timeout=TIMEOUT_SECONDS)
    first = outputs(scratch, "due")
    assert (out / "admin.crt").read_text().strip() == str(first["certPem"]).strip()
    assert len((out / "runs").read_text().splitlines()) == 1

    # The engine's own plan: the certificate replaced, the step that carries it updated, nothing else touched.
    ops = planned_ops(scratch, "due")
    changed = {urn: found for urn, found in ops.items() if found != {"same"}}
    assert by_suffix(ops, CERT_URN_SUFFIX) & {"replace", "create-replacement"}, changed
    assert by_suffix(ops, STEP_URN_SUFFIX) == {"update"}, changed
    assert {urn.rsplit("::", 1)[-1] for urn in changed} == {"admin-client-cert", "place-admin-cert"}, changed

    up = scratch.must("up", "--stack", "due", "--yes", timeout=TIMEOUT_SECONDS)
    second = outputs(scratch, "due")
    print(
        f"due: second up {up.seconds:.1f} s; serial {serial(str(first['certPem']))} -> "
        f"{serial(str(second['certPem']))}; ends {first['validityEndTime']} -> {second['validityEndTime']}"
    )
    assert second["certPem"] != first["certPem"]
    assert serial(str(second["certPem"])) != serial(str(first["certPem"]))
    # The step ran again, on the "node", with the new certificate.
    assert len((out / "runs").read_text().splitlines()) == 2
    assert (out / "admin.crt").read_text().strip() == str(second["certPem"]).strip()
    assert "PRIVATE KEY" not in "".join(run.output for run in scratch.runs)

    # A window as long as the validity is never left: the next run re-issues again (the provider compares
    # `validity_end_time - early_renewal_hours` with the run's time, nothing else). The config's bound on
    # `certificates.renewBeforeDays` keeps the product's window shorter than the one-year validity.
    assert by_suffix(planned_ops(scratch, "due"), CERT_URN_SUFFIX) & {"replace", "create-replacement"}
    longest = max(m.le for m in CertificatesConfig.model_fields["renew_before_days"].metadata if hasattr(m, "le"))
    assert longest * 24 < CLIENT_VALIDITY_HOURS, longest


def test_a_certificate_outside_its_window_is_left_alone(scratch: ScratchProject) -> None:
    out = stack(scratch, "calm", LEAF_EARLY_RENEWAL_HOURS)
    scratch.must("up", "--stack", "calm", "--yes", timeout=TIMEOUT_SECONDS)
    first = outputs(scratch, "calm")
    assert first["readyForRenewal"] is False, first
    again = scratch.must("up", "--stack", "calm", "--yes", "--expect-no-changes", timeout=TIMEOUT_SECONDS)
    print(f"calm: second up (no changes) {again.seconds:.1f} s")
    assert outputs(scratch, "calm")["certPem"] == first["certPem"]
    assert len((out / "runs").read_text().splitlines()) == 1
    assert "PRIVATE KEY" not in "".join(run.output for run in scratch.runs)
