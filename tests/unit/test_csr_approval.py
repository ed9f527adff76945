"""The kubelet-serving CSR approver (render/csr_approval.py), run for real against forged CSRs.

Every CSR here is a real PKCS#10 request made with `cryptography`, wrapped in the CertificateSigningRequest
object the API server would list. The approver scripts are rendered as the steps send them and run unmodified
with bash as root in the sandbox (tests/sandbox.py), with the real python3 running the real node program.

`kubectl` is a stand-in, because a unit test has no API server: it serves a CertificateSigningRequestList from
the sandbox's state, records every `certificate approve` (and marks the CSR approved), and refuses any call
without --kubeconfig admin.conf and --request-timeout. `openssl` is a stand-in for the one-shot step's TLS probe
of each kubelet (a node "serves" once its CSR was approved). What the real API server, controller manager and
openssl do with the same scripts is proven in tests/real/test_csr_approval_live.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from model.addressing import plan_addresses
from render.admin_node import ADMIN_KUBECONFIG
from render.csr_approval import (
    APPROVER_PATH,
    SERVICE,
    TIMER,
    UNIT_DIR,
    approve_step_script,
    approver_files,
    approver_script,
    install_approver_script,
    serving_plan,
)
from tests.sandbox import Sandbox, Stub, unavailable
from tests.stacks import stack_config

PLAN_NODES = plan_addresses(stack_config("dev"))
PLAN = serving_plan([*PLAN_NODES.control_planes, *PLAN_NODES.workers])
ADDRESS = {entry.hostname: entry.ips[0] for entry in PLAN}
HOST = "dev-cp-1"
NODE = "dev-worker-1"
SERVING = "kubernetes.io/kubelet-serving"
USAGES = ["digital signature", "server auth"]
KEY = ec.generate_private_key(ec.SECP256R1())

_KUBECTL_HELPER = r"""
import json, os, sys
state = os.environ["STATE"]
args = sys.argv[1:]
if args[:2] != ["--kubeconfig", "@ADMIN@"] or not any(a.startswith("--request-timeout=") for a in args):
    sys.exit(f"stand-in kubectl: unbounded or without admin.conf: {args}")
if os.path.exists(os.path.join(state, "api-down")):
    sys.exit("The connection to the server 10.17.3.10:6443 was refused")
rest = [a for a in args[2:] if not a.startswith("--request-timeout=")]
listing = os.path.join(state, "csrs.json")
with open(listing) as f:
    csrs = json.load(f)
if rest == ["get", "certificatesigningrequests", "--output", "json"]:
    print(json.dumps(csrs))
elif rest[:1] == ["get"] and any(a.startswith("--sort-by=") for a in rest):
    for item in csrs["items"]:
        print(item["metadata"]["name"], item["spec"]["signerName"], item["spec"]["username"], "Pending")
elif rest[:2] == ["certificate", "approve"] and len(rest) == 3:
    if os.path.exists(os.path.join(state, "approve-fails")):
        sys.exit("Error from server (Forbidden): cannot approve")
    item = next(i for i in csrs["items"] if i["metadata"]["name"] == rest[2])
    item.setdefault("status", {})["conditions"] = [{"type": "Approved", "status": "True"}]
    with open(listing, "w") as f:
        json.dump(csrs, f)
    user = item["spec"]["username"]
    # "api-lost-after-approve": the API is gone from now on, and the kubelet serves from its next probe.
    lost = os.path.exists(os.path.join(state, "api-lost-after-approve"))
    if lost:
        open(os.path.join(state, "api-down"), "w").close()
    serving = os.path.join(state, "serving-later" if lost else "serving")
    os.makedirs(serving, exist_ok=True)
    open(os.path.join(serving, user.removeprefix("system:node:")), "w").close()
    print(f"certificatesigningrequest.certificates.k8s.io/{rest[2]} approved")
else:
    sys.exit(f"stand-in kubectl: unexpected call {rest}")
""".replace("@ADMIN@", ADMIN_KUBECONFIG)

# The one-shot step's probe: `openssl s_client ... -verify_hostname NAME -verify_ip IP` succeeds once NAME serves.
_OPENSSL = """
[ "$1" = s_client ] || { echo "stand-in openssl: unexpected call $*" >&2; exit 2; }
name_="$(opt -verify_hostname "$@")"
[ -f "$STATE/serving/$name_" ] && exit 0
if [ -f "$STATE/serving-later/$name_" ]; then
  mkdir -p "$STATE/serving" && mv "$STATE/serving-later/$name_" "$STATE/serving/"
fi
exit 1
"""

_SYSTEMCTL = """
case "$1" in
  is-enabled) [ -f "$STATE/enabled" ] ;;
  is-active) [ -f "$STATE/active" ] ;;
  enable) touch "$STATE/enabled" ;;
  restart) touch "$STATE/active" ;;
  daemon-reload) ;;
  *) echo "stand-in systemctl: unexpected call $*" >&2; exit 2 ;;
esac
"""


# --- forged requests --------------------------------------------------------------------------------------


def csr_pem(
    cn: str = f"system:node:{NODE}",
    organizations: Sequence[str] = ("system:nodes",),
    dns: Sequence[str] = (NODE,),
    ips: Sequence[str] = (ADDRESS[NODE],),
    *,
    others: Sequence[x509.GeneralName] = (),
    extra_subject: Sequence[x509.NameAttribute] = (),
    critical: bool = False,
    extension: x509.ExtensionType | None = None,
) -> bytes:
    """A PKCS#10 request as kubelet makes it (Go puts O before CN), or with the given changes."""
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    subject += [x509.NameAttribute(NameOID.COMMON_NAME, cn), *extra_subject]
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if names or others:
        builder = builder.add_extension(x509.SubjectAlternativeName([*names, *others]), critical=critical)
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def csr_object(
    name: str,
    pem: bytes,
    *,
    username: str = f"system:node:{NODE}",
    groups: Sequence[str] = ("system:nodes", "system:authenticated"),
    usages: Sequence[str] = USAGES,
    signer: str = SERVING,
    conditions: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": base64.b64encode(pem).decode(),
            "signerName": signer,
            "usages": list(usages),
            "username": username,
            "groups": list(groups),
        },
        "status": {"conditions": [{"type": kind, "status": "True"} for kind in conditions]} if conditions else {},
    }


def right(name: str = "csr-right") -> dict[str, Any]:
    return csr_object(name, csr_pem())


CP = "dev-cp-2"
FORGED: dict[str, tuple[dict[str, Any], str]] = {
    "extra DNS name": (csr_object("csr-x", csr_pem(dns=(NODE, "kubernetes.default"))), 'not planned ["kubernetes'),
    "missing IP": (csr_object("csr-x", csr_pem(ips=())), 'missing ["10.17.3.51"]'),
    "wrong IP": (csr_object("csr-x", csr_pem(ips=("10.17.3.99",))), 'not planned ["10.17.3.99"]'),
    "extra IP": (csr_object("csr-x", csr_pem(ips=(ADDRESS[NODE], "10.17.3.10"))), 'not planned ["10.17.3.10"]'),
    "repeated DNS name": (csr_object("csr-x", csr_pem(dns=(NODE, NODE))), f'repeated ["{NODE}"]'),
    "another node's names": (csr_object("csr-x", csr_pem(dns=(CP,), ips=(ADDRESS[CP],))), "DNS names for"),
    "another node asks for this node": (
        csr_object("csr-x", csr_pem(), username=f"system:node:{CP}"),
        f"the subject is not exactly CN=system:node:{CP}",
    ),
    "a non-node user": (
        csr_object("csr-x", csr_pem(), username="kubernetes-admin", groups=("kubeadm:cluster-admins",)),
        "the requester is not a node",
    ),
    "not in system:nodes": (csr_object("csr-x", csr_pem(), groups=("system:authenticated",)), "group system:nodes"),
    "a node not in the plan": (
        csr_object(
            "csr-x",
            csr_pem(cn="system:node:dev-worker-9", dns=("dev-worker-9",), ips=("10.17.3.59",)),
            username="system:node:dev-worker-9",
        ),
        'node "dev-worker-9" is not one the program planned',
    ),
    "wrong O": (csr_object("csr-x", csr_pem(organizations=("system:masters",))), "the subject is not exactly"),
    "two Os": (
        csr_object("csr-x", csr_pem(organizations=("system:nodes", "system:masters"))),
        "the subject is not exactly",
    ),
    "an extra OU": (
        csr_object("csr-x", csr_pem(extra_subject=[x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x")])),
        "the subject is not exactly",
    ),
    "another CN": (csr_object("csr-x", csr_pem(cn=f"system:node:{CP}")), "the subject is not exactly"),
    "an extra usage": (csr_object("csr-x", csr_pem(), usages=[*USAGES, "client auth"]), "usages"),
    "RSA-style usages": (csr_object("csr-x", csr_pem(), usages=[*USAGES, "key encipherment"]), "usages"),
    "an email SAN": (csr_object("csr-x", csr_pem(others=[x509.RFC822Name("a@b.c")])), "email SAN"),
    "a URI SAN": (csr_object("csr-x", csr_pem(others=[x509.UniformResourceIdentifier("spiffe://x")])), "URI SAN"),
    "a critical SAN": (csr_object("csr-x", csr_pem(critical=True)), "critical"),
    "an extra extension": (
        csr_object("csr-x", csr_pem(extension=x509.BasicConstraints(ca=True, path_length=None))),
        "extensions kubelet does not (2.5.29.19)",
    ),
    # OpenSSL 3.0 `req -text` prints this one DNS name exactly as the planned DNS name and IP address.
    "a DNS name that reads like two SANs": (
        csr_object("csr-x", csr_pem(dns=(f"{NODE}, IP Address:{ADDRESS[NODE]}",), ips=())),
        "DNS names for",
    ),
    "a second PEM block": (
        csr_object("csr-x", csr_pem() + csr_pem(cn="system:node:x")),
        "not exactly one PEM CERTIFICATE REQUEST block",
    ),
}


# --- running the scripts ----------------------------------------------------------------------------------


@pytest.fixture
def box(sandbox_support: None, tmp_path: Path) -> Sandbox:
    helper = tmp_path / "kubectl_stand_in.py"
    helper.write_text(_KUBECTL_HELPER)
    stubs: dict[str, str | Stub] = {
        "kubectl": f'exec {sys.executable} {helper} "$@"',
        "openssl": _OPENSSL,
        "systemctl": _SYSTEMCTL,
        "sleep": "exec /bin/sleep 0.2",
    }
    return Sandbox(tmp_path / "box", stubs)


def serve(box: Sandbox, *items: dict[str, Any]) -> None:
    # As kubectl prints a list (k8s.io/kubectl pkg/cmd/get/get.go): a v1 List of the objects.
    listed = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": list(items)}
    box.put_state("csrs.json", json.dumps(listed))


def approved(box: Sandbox) -> list[str]:
    return [call[-1] for call in box.call_lines() if call[0] == "kubectl" and "approve" in call]


def sweep(box: Sandbox, *items: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    serve(box, *items)
    return box.run(approver_script(HOST, PLAN).render())


def test_the_right_csr_is_approved(box: Sandbox) -> None:
    ran = sweep(box, right())
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert approved(box) == ["csr-right"]
    assert f"approved kubelet-serving CSR csr-right of node {NODE}" in ran.stdout
    assert "left pending" not in ran.stderr


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_csr_stays_pending_and_is_reported(box: Sandbox, case: str) -> None:
    forged, why = FORGED[case]
    ran = sweep(box, forged, right())
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert approved(box) == ["csr-right"], case
    report = [line for line in ran.stderr.splitlines() if "left pending" in line]
    assert len(report) == 1 and '"csr-x"' in report[0] and why in report[0], ran.stderr
    assert f"requested by {json.dumps(forged['spec']['username'])}" in report[0]
    assert not [call for call in box.call_lines() if "deny" in call], "nothing is ever denied"


@pytest.mark.parametrize(
    "other",
    [
        csr_object("csr-client", csr_pem(), signer="kubernetes.io/kube-apiserver-client-kubelet"),
        csr_object("csr-legacy", csr_pem(), signer="kubernetes.io/legacy-unknown"),
        csr_object("csr-done", csr_pem(), conditions=["Approved"]),
        csr_object("csr-denied", csr_pem(), conditions=["Denied"]),
        csr_object("csr-failed", csr_pem(), conditions=["Approved", "Failed"]),
    ],
    ids=["client signer", "another signer", "already approved", "denied", "failed"],
)
def test_other_signers_and_decided_csrs_are_left_alone(box: Sandbox, other: dict[str, Any]) -> None:
    ran = sweep(box, other)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert approved(box) == [] and "left pending" not in ran.stderr


def test_every_planned_node_and_nothing_else(box: Sandbox) -> None:
    items = [
        csr_object(f"csr-{entry.hostname}", csr_pem(f"system:node:{entry.hostname}", dns=entry.dns, ips=entry.ips),
                   username=f"system:node:{entry.hostname}")
        for entry in PLAN
    ]  # fmt: skip
    forged = [{**item, "metadata": {"name": f"csr-forged-{n}"}} for n, (item, _) in enumerate(FORGED.values())]
    ran = sweep(box, *items, *forged)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert sorted(approved(box)) == sorted(f"csr-{entry.hostname}" for entry in PLAN)
    assert ran.stderr.count("left pending") == len(FORGED)


def test_no_api_is_a_failure(box: Sandbox) -> None:
    box.put_state("api-down")
    ran = sweep(box, right())
    assert ran.returncode != 0
    assert f"cannot list the CertificateSigningRequests from {HOST}" in ran.stderr
    assert approved(box) == []


def test_a_refused_approval_is_a_failure(box: Sandbox) -> None:
    box.put_state("approve-fails")
    ran = sweep(box, right())
    assert ran.returncode != 0
    assert f"could not approve kubelet-serving CSR csr-right of node {NODE}" in ran.stderr


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        ({"kind": "Status", "items": []}, "not a list of CertificateSigningRequests"),
        ({"kind": "CertificateSigningRequestList", "items": []}, "not a list of CertificateSigningRequests"),
        ({"kind": "List", "items": {}}, "not a list of CertificateSigningRequests"),
        ({"kind": "List", "items": [{"kind": "Pod"}]}, "objects that are not CertificateSigningRequests"),
    ],
)
def test_a_list_that_is_not_a_csr_list_is_a_failure(box: Sandbox, listed: dict[str, Any], why: str) -> None:
    box.put_state("csrs.json", json.dumps(listed))
    ran = box.run(approver_script(HOST, PLAN).render())
    assert ran.returncode != 0 and approved(box) == []
    assert why in ran.stderr and f"the CSR list read on {HOST} could not be checked" in ran.stderr


# --- the timer and the one-shot step ------------------------------------------------------------------------


def sbin(box: Sandbox) -> tuple[Path, str]:
    """/usr/local/sbin is not one of the sandbox's overlays: the runs get a directory of the test's bound there."""
    directory = box.root / "sbin"
    directory.mkdir(exist_ok=True)
    return directory, f"mount --bind {directory} /usr/local/sbin"


def test_the_timer_is_installed_once(box: Sandbox) -> None:
    directory, setup = sbin(box)
    script = install_approver_script(HOST, PLAN)
    calls = box.run_first(script, setup=setup)
    assert calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", TIMER], ["systemctl", "restart", TIMER]]
    for path, (content, mode) in approver_files(HOST, PLAN).items():
        written = directory / Path(path).name if path == APPROVER_PATH else box.file(path)
        assert written.read_text() == content and written.stat().st_mode & 0o777 == mode
    assert (directory / Path(APPROVER_PATH).name).read_text() == approver_script(HOST, PLAN).render()
    assert f"ExecStart={APPROVER_PATH}" in box.file(f"{UNIT_DIR}/{SERVICE}").read_text()
    before = len(box.call_lines())
    again = box.run(script.render(), setup=setup)
    assert again.stdout == f"kubeadm-ha: {script.step} already done on {HOST}; nothing to do\n", again.stderr
    assert all(
        call[:2] in (["systemctl", "is-enabled"], ["systemctl", "is-active"]) for call in box.call_lines()[before:]
    )
    changed = install_approver_script(HOST, PLAN[:2])
    assert box.run(changed.render(), setup=setup).returncode == 0
    assert (directory / Path(APPROVER_PATH).name).read_text() == approver_script(HOST, PLAN[:2]).render()


def test_the_installed_approver_runs_as_the_timer_runs_it(box: Sandbox) -> None:
    _, setup = sbin(box)
    box.run_first(install_approver_script(HOST, PLAN), setup=setup)
    serve(box, right())
    ran = box.run(f"exec {APPROVER_PATH}\n", setup=setup)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert approved(box) == ["csr-right"]


def test_the_step_approves_and_waits_until_every_kubelet_serves(box: Sandbox) -> None:
    for entry in PLAN:
        if entry.hostname != NODE:
            box.put_state(f"serving/{entry.hostname}")
    serve(box, right(), FORGED["wrong IP"][0])
    script = approve_step_script(HOST, PLAN, wait_seconds=30)
    box.run_first(script)
    assert approved(box) == ["csr-right"]
    box.run_again(script, lambda call: call[:2] == ["openssl", "s_client"])


def test_the_step_ends_once_every_kubelet_serves_though_the_api_is_gone(box: Sandbox) -> None:
    """The cluster lab (run 14): every planned kubelet served a certificate from the cluster CA, yet the step
    gave up, because each round also required listing the CSRs, which a starved API no longer answered.
    Approving is the means; the kubelets serving is the goal, and ends the wait."""
    for entry in PLAN:
        if entry.hostname != NODE:
            box.put_state(f"serving/{entry.hostname}")
    serve(box, right())
    box.put_state("api-lost-after-approve")
    ran = box.run(approve_step_script(HOST, PLAN, wait_seconds=10).render())
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert approved(box) == ["csr-right"]
    # The last round could not list the CSRs, and says so; it still ended the step.
    assert f"cannot list the CertificateSigningRequests from {HOST}" in ran.stderr


def test_the_step_gives_up_naming_the_kubelet_and_why(box: Sandbox) -> None:
    for entry in PLAN:
        if entry.hostname != NODE:
            box.put_state(f"serving/{entry.hostname}")
    serve(box, FORGED["wrong IP"][0])
    ran = box.run(approve_step_script(HOST, PLAN, wait_seconds=2).render())
    assert ran.returncode != 0
    assert f"the kubelet of: {NODE}. Its kubelet-serving CSR did not appear, or stayed pending" in ran.stderr
    assert 'left pending for an operator: kubelet-serving CSR "csr-x"' in ran.stderr
    assert 'not planned ["10.17.3.99"]' in ran.stderr
    assert "csr-x kubernetes.io/kubelet-serving" in ran.stderr  # the CSR table
    assert approved(box) == []


def test_the_probe_asks_for_the_cluster_ca_the_name_and_the_address(box: Sandbox) -> None:
    serve(box)
    box.run(approve_step_script(HOST, PLAN, wait_seconds=1).render())
    probes = {tuple(call) for call in box.call_lines() if call[0] == "openssl"}
    expected = {
        ("openssl", "s_client", "-connect", f"{entry.ips[0]}:10250", "-CAfile", "/etc/kubernetes/pki/ca.crt",
         "-verify_return_error", "-verify_hostname", entry.hostname, "-verify_ip", entry.ips[0])
        for entry in PLAN
    }  # fmt: skip
    assert probes == expected


@pytest.mark.parametrize("which", ["approver", "install", "step"])
def test_shellcheck(tmp_path: Path, which: str) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck is not installed (Debian package `shellcheck`)")
    script = {
        "approver": approver_script(HOST, PLAN),
        "install": install_approver_script(HOST, PLAN),
        "step": approve_step_script(HOST, PLAN),
    }[which]
    path = tmp_path / "script.sh"
    path.write_text(script.render())
    result = subprocess.run(
        [shellcheck, "--severity=warning", "--shell=bash", "--format=gcc", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_plan_is_sorted_and_what_kubelet_asks_for() -> None:
    shuffled = serving_plan(reversed([*PLAN_NODES.workers, *PLAN_NODES.control_planes]))
    assert shuffled == PLAN
    assert [(e.hostname, e.dns, e.ips) for e in PLAN][:1] == [("dev-cp-1", ("dev-cp-1",), ("10.17.3.31",))]
    assert approve_step_script(HOST, shuffled).render() == approve_step_script(HOST, PLAN).render()
