"""The cluster lab's due certificate renewal (tests/real/cluster_lab.py, issue 21): a real `pulumi up` that finds
kubeadm's certificates due on every control plane and renews them, while a prober counts the API's answers
through the VIP.

A new cluster's certificates are a year from their end, and `certificates.renewBeforeDays` is at most 300, so
nothing is due on the day it is built. The lab makes the cluster "340 days old" in the two places the product
looks (components/certificates.py):
- on the nodes, the certificates themselves: `kubeadm certs renew all` with `certificateValidityPeriod: 720h`
  re-issues every certificate kubeadm made there to end in 30 days (kubeadm v1.37.2
  cmd/kubeadm/app/phases/certs/renewal/manager.go: `cfg.NotAfter = startTime.Add(CertificateValidityPeriod)`),
  so the step's own test (`date -u +%s` on the node) finds them within the default 60-day window;
- in the program, the run's time: the Pulumi program runs under libfaketime 340 days ahead, so the expiry the
  stack recorded when it was built (a year after) is within the window too, and the program raises each control
  plane's renewal generation. Only the Python program sees the shifted clock: the Go CLI, language host and
  providers read the time without libc (the vDSO), and the nodes keep theirs.
Afterwards every certificate must end about a year after now, each generation must be one higher, and a second
`pulumi up` on the real clock must change nothing.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.certificates import CERTIFICATE_RENEWALS_OUTPUT
from render.scripts import Script, command, quote
from tests.real.cluster_checks import CheckFailed, Kubectl
from tests.real.engine.lab_stack import LabStack
from tools.access import Node, SshTransport, StackAccess, run_checked

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")  # Debian's libfaketime
AGE_DAYS = 340
SHORT_VALIDITY = "720h"
SHORT_VALIDITY_DAYS = 30
PROBE_INTERVAL_SECONDS = 1.0
PROBE_ATTEMPTS = 3
MAX_SINGLE_OUTAGE_SECONDS = 300
CERTS_TIMEOUT_SECONDS = 300
# kubeadm's certificates on a control plane (`kubeadm certs check-expiration` lists the same ones).
CERTIFICATES = (
    "/etc/kubernetes/pki/apiserver.crt",
    "/etc/kubernetes/pki/apiserver-kubelet-client.crt",
    "/etc/kubernetes/pki/front-proxy-client.crt",
    "/etc/kubernetes/pki/apiserver-etcd-client.crt",
    "/etc/kubernetes/pki/etcd/server.crt",
    "/etc/kubernetes/pki/etcd/peer.crt",
    "/etc/kubernetes/pki/etcd/healthcheck-client.crt",
)


def faketime_env() -> dict[str, str]:
    """The environment that runs the Pulumi program AGE_DAYS ahead (monotonic clocks untouched)."""
    if not LIBFAKETIME.exists():
        raise CheckFailed(f"{LIBFAKETIME} is missing: `apt-get install libfaketime` (Debian) for the renewal stage")
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"+{AGE_DAYS}d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class NetnsSsh(SshTransport):
    """The operator tools' SSH (pinned host key, the stack's key, sudo) run inside the lab's network namespace."""

    def __init__(self, access: StackAccess, workdir: Path, prefix: list[str]) -> None:
        super().__init__(access, workdir)
        self.prefix = prefix

    def ssh_argv(self, node: Node) -> list[str]:
        return [*self.prefix, *super().ssh_argv(node)]


def age_script(host: str, version: str) -> Script:
    config = "\n".join(
        [
            "apiVersion: kubeadm.k8s.io/v1beta4",
            "kind: ClusterConfiguration",
            f"kubernetesVersion: v{version}",  # else kubeadm asks dl.k8s.io for the stable version
            f"certificateValidityPeriod: {SHORT_VALIDITY}",
            "",
        ]
    )
    return Script(
        step="lab-age-certificates",
        host=host,
        done_when="false",
        body=(
            'work="$(mktemp -d)"',
            "trap 'rm -rf \"$work\"' EXIT",
            f'printf "%s" {quote(config)} >"$work/age.yaml"',
            command("kubeadm", "certs", "renew", "all") + ' --config "$work/age.yaml"',
        ),
    )


def expiry_script(host: str) -> Script:
    """Each certificate's end, in seconds since the epoch: `PATH SECONDS` lines."""
    body = [f'printf "%s %s\\n" {p} "$(date -u -d "$(openssl x509 -noout -enddate -in {p} | cut -d= -f2)" +%s)"'
            for p in CERTIFICATES]  # fmt: skip
    return Script(step="lab-certificate-ends", host=host, done_when="false", body=tuple(body))


def certificate_ends(transport: SshTransport, node: Node) -> dict[str, int]:
    text = run_checked(transport, node, expiry_script(node.hostname), timeout=CERTS_TIMEOUT_SECONDS)
    pairs = (line.split() for line in text.splitlines() if line.startswith("/"))
    return {path: int(end) for path, end in pairs}


def age_certificates(transport: SshTransport, nodes: list[Node], version: str) -> str:
    """Re-issue kubeadm's certificates on every control plane to end in SHORT_VALIDITY_DAYS; checked by openssl."""
    now = int(time.time())
    for node in nodes:
        run_checked(transport, node, age_script(node.hostname, version), timeout=CERTS_TIMEOUT_SECONDS)
        ends = certificate_ends(transport, node)
        late = {p: e for p, e in ends.items() if e > now + (SHORT_VALIDITY_DAYS + 1) * 86400}
        if late or len(ends) != len(CERTIFICATES):
            raise CheckFailed(f"{node.hostname}: not re-issued to end within {SHORT_VALIDITY_DAYS} days: {late}")
    return f"{len(nodes)} control planes' certificates end within {SHORT_VALIDITY_DAYS} days"


def renewed(transport: SshTransport, nodes: list[Node]) -> str:
    """Every kubeadm certificate on every control plane ends 364-366 days from now."""
    now = int(time.time())
    for node in nodes:
        ends = certificate_ends(transport, node)
        wrong = {p: e for p, e in ends.items() if not now + 364 * 86400 <= e <= now + 366 * 86400}
        if wrong:
            raise CheckFailed(f"{node.hostname}: not renewed for a year: {wrong}")
    day = datetime.datetime.fromtimestamp(now + 365 * 86400, datetime.UTC).date()
    return f"every kubeadm certificate on {len(nodes)} control planes ends about {day}"


@dataclass
class ApiProbe:
    """Asks the API through the VIP every second: a request fails only when PROBE_ATTEMPTS tries in a row did.
    It also keeps the longest outage: from a failed request to the next answered one."""

    kubectl: Kubectl
    sent: int = 0
    retried: int = 0
    failed: list[str] = field(default_factory=list)
    longest_outage: float = 0.0
    down_since: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ApiProbe:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _ask(self) -> str:
        done = self.kubectl.run("get", "--raw", "/api/v1/namespaces/kube-system", timeout=30)
        if done.returncode == 0 and json.loads(done.stdout).get("kind") == "Namespace":
            return ""
        return (done.stderr or done.stdout).strip()[-200:] or f"exit {done.returncode}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            started = time.monotonic()
            error = self._ask()
            for _ in range(PROBE_ATTEMPTS - 1):
                if not error:
                    break
                self.retried += 1
                time.sleep(1)
                error = self._ask()
            if error:
                self.failed.append(f"{time.strftime('%H:%M:%S')} {error}")
                self.down_since = self.down_since or started
            elif self.down_since is not None:
                self.longest_outage = max(self.longest_outage, time.monotonic() - self.down_since)
                self.down_since = None
            self._stop.wait(PROBE_INTERVAL_SECONDS)

    def account(self) -> str:
        outage = f", longest outage {self.longest_outage:.0f} s" if self.failed else ""
        return f"{self.sent} requests through the VIP, {len(self.failed)} failed, {self.retried} retried{outage}"


def renewal_stage(
    lab: LabStack, kubectl: Kubectl, transport: SshTransport, nodes: list[Node], version: str, timeout: float
) -> str:
    """Age the certificates, then one `pulumi up` 340 days ahead renews them while the prober asks the API.

    With two or more control planes no request may fail (the step restarts one API server at a time, each out
    of the load balancers first). With one there is nothing to fail over to: each restart of its API server is
    an outage, which is measured and must end (the API answers afterwards) within MAX_SINGLE_OUTAGE_SECONDS."""
    before = lab.output(CERTIFICATE_RENEWALS_OUTPUT)
    aged = age_certificates(transport, nodes, version)
    with ApiProbe(kubectl) as probe:
        run = lab.pulumi("up", "--yes", "--json", timeout=timeout, env=faketime_env())
    if run.returncode != 0:
        raise CheckFailed(f"pulumi up (+{AGE_DAYS} days) exit {run.returncode} in {run.seconds:.0f} s: {run.errors()}")
    after = lab.output(CERTIFICATE_RENEWALS_OUTPUT)
    changed = sorted(urn.rsplit("::", 1)[1] for urn, op in run.steps().items() if op not in ("same", "read"))
    generations = {
        name: (int(before.get(name, 0)), int(after.get(name, -1))) for name in (node.hostname for node in nodes)
    }
    if any(new != old + 1 for old, new in generations.values()):
        raise CheckFailed(f"renewal generations (before, after): {generations}")
    account = renewed(transport, nodes)
    if probe.down_since is not None:
        raise CheckFailed(f"the API did not answer again after the renewal: {probe.account()}: {probe.failed[-5:]}")
    if probe.failed and (len(nodes) > 1 or probe.longest_outage > MAX_SINGLE_OUTAGE_SECONDS):
        raise CheckFailed(f"{probe.account()} during the renewal ({len(nodes)} control planes): {probe.failed[:10]}")
    single = " (one API server: its restarts are outages)" if probe.failed else ""
    return f"{aged}; up +{AGE_DAYS} d {run.seconds:.0f} s, changed {changed}; {probe.account()}{single}; {account}"
