"""A real HA control plane from the program's output, behind the program's load balancer (section 3 of issue 9).

prod (external etcd, two load balancers with keepalived, three control planes) at the default Kubernetes
version, built as tests/real/control_plane_lab.py describes: real etcd, kube-apiserver and
kube-controller-manager from kubeadm's own manifests, HAProxy and keepalived from the program's files.

Proven, in order (the lab is shared; every test leaves it as it found it):
1. HAProxy's `GET /readyz` check marks every real API server up; the program's `kubeconfig` output works
   through the VIP (its admin group is bound to cluster-admin by kubeadm);
2. the controller manager's bootstrap signer signs cluster-info for the program's token;
3. token refresh: the program's `join-token` step script, run for real on the admin node with its own
   stdin, for: no token, a fresh one, one with 23 h left, one about to expire, an expired one, and three
   steps at once; after each run exactly one token with the program's ID exists, valid for ~24 h, and no
   run failed;
4. discovery: `kubeadm join --dry-run` with a worker's JoinConfiguration reaches the cluster through the
   VIP and validates the CA; a wrong hash and another CA's hash are refused;
5. a dead API server is taken out by HAProxy and traffic keeps flowing; a dead HAProxy moves the VIP;
6. external etcd: losing one member keeps the API writable; losing two makes it unready (HAProxy takes
   every backend out) until one returns, with every acknowledged write intact.

Binaries: tests/real/build-binaries kubeadm kube-apiserver kube-controller-manager kubectl etcd etcdctl
(kube-scheduler too when built). Debian: haproxy keepalived curl iproute2. Root.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from components.pki import ca_cert_hash
from model.versions import DEFAULT_KUBERNETES
from render.kubeadm import JOIN_CONFIG_PATH
from tests.integration.conftest import in_ci, phase_failed, require_programs, require_root
from tests.integration.netns import Lab, cleanup_stale, poll_until
from tests.real.binaries import binary, cached_path
from tests.real.control_plane_lab import COMPONENTS, ControlPlaneLab, report
from tests.real.documents import join_documents, step_files
from tools.plan import mask, script_of

pytestmark = pytest.mark.real

STACK = "prod"
VERSION = DEFAULT_KUBERNETES
REQUIRED = ("kubeadm", "kube-apiserver", "kube-controller-manager", "kubectl", "etcd", "etcdctl")
TOKEN_SECRET_PREFIX = "bootstrap-token-"
SIGNER_BOUND = 60.0
SCRIPT_BOUND = 180.0
DISCOVERY_BOUND = 150.0


@pytest.fixture(scope="module")
def cp_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneLab]:
    require_root()
    programs = require_programs("ip", "haproxy", "keepalived", "curl", "unshare")
    binaries = {name: binary(name, VERSION) for name in REQUIRED}
    components: tuple[str, ...] = COMPONENTS
    if cached_path("kube-scheduler", VERSION).is_file() or in_ci():
        binaries["kube-scheduler"] = binary("kube-scheduler", VERSION)
    else:
        components = tuple(c for c in COMPONENTS if c != "kube-scheduler")
        report("kube-scheduler is not built: the lab runs without it (nothing here needs a scheduler)")
    cleanup_stale()
    work = tmp_path_factory.mktemp("cp-lab")
    lab = Lab("cp", log_dir=work / "logs")
    live: ControlPlaneLab | None = None
    failed = False
    try:
        live = ControlPlaneLab(lab, work, STACK, VERSION, binaries, programs)
        live.start_etcd()
        live.prepare_control_planes()
        live.start_control_planes(components)
        live.start_load_balancers()
        first = live.nodes[live.plan.control_planes[0].hostname]
        for phase in (["upload-config", "all"], ["bootstrap-token"]):
            ran = live.kubeadm(first, "init", "phase", *phase, "--config", "/etc/kubernetes/kubeadm-ha/init.yaml")
            assert ran.returncode == 0, ran.output
        yield live
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request):
            print(f"\n===== logs of lab {lab.prefix} =====\n{mask_logs(lab)}")
        lab.close()
        if live is not None:
            live.close()


def mask_logs(lab: Lab) -> str:
    return mask(lab.logs(tail=30))


# ----------------------------------------------------------------------------- helpers


def token_id(lab: ControlPlaneLab) -> str:
    return lab.token.split(".", 1)[0]


def token_secret(lab: ControlPlaneLab) -> dict[str, str] | None:
    """The decoded data of the program's bootstrap-token Secret, or None when it does not exist."""
    response = lab.request("GET", f"/api/v1/namespaces/kube-system/secrets/{TOKEN_SECRET_PREFIX}{token_id(lab)}")
    if response.status == 404:
        return None
    assert response.status == 200, response.status
    return {key: base64.b64decode(value).decode() for key, value in response.json().get("data", {}).items()}


def bootstrap_tokens(lab: ControlPlaneLab) -> list[str]:
    response = lab.request(
        "GET", "/api/v1/namespaces/kube-system/secrets?fieldSelector=type%3Dbootstrap.kubernetes.io%2Ftoken"
    )
    assert response.status == 200, response.status
    return [item["metadata"]["name"] for item in response.json()["items"]]


def expiration(data: dict[str, str]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(data["expiration"].replace("Z", "+00:00"))


def left(data: dict[str, str]) -> float:
    return (expiration(data) - datetime.datetime.now(datetime.UTC)).total_seconds()


def assert_one_valid_token(lab: ControlPlaneLab, *, at_least_hours: float = 23.0) -> dict[str, str]:
    data = token_secret(lab)
    assert data is not None, "the program's bootstrap token does not exist"
    assert bootstrap_tokens(lab) == [f"{TOKEN_SECRET_PREFIX}{token_id(lab)}"]
    assert data["token-id"] == token_id(lab)
    # The secret half is compared by digest: it never appears in a report.
    secret = lab.token.split(".", 1)[1]
    assert hashlib.sha256(data["token-secret"].encode()).digest() == hashlib.sha256(secret.encode()).digest()
    assert data.get("usage-bootstrap-authentication") == "true" and data.get("usage-bootstrap-signing") == "true"
    assert left(data) > at_least_hours * 3600, f"the token expires in {left(data) / 3600:.1f} h"
    return data


def set_expiration(lab: ControlPlaneLab, moment: datetime.datetime) -> None:
    stamp = moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {"data": {"expiration": base64.b64encode(stamp.encode()).decode()}}
    response = lab.request(
        "PATCH",
        f"/api/v1/namespaces/kube-system/secrets/{TOKEN_SECRET_PREFIX}{token_id(lab)}",
        body=patch,
        content_type="application/merge-patch+json",
    )
    assert response.status == 200, response.status


def delete_token(lab: ControlPlaneLab) -> None:
    response = lab.request("DELETE", f"/api/v1/namespaces/kube-system/secrets/{TOKEN_SECRET_PREFIX}{token_id(lab)}")
    assert response.status in (200, 404), response.status


def token_step(lab: ControlPlaneLab, worker: int = 1) -> tuple[str, str, str]:
    """(admin hostname, script, stdin) of the program's token step for worker `worker`."""
    step = lab.evaluation.named(f"{STACK}-worker-{worker}-join-token")
    host = step.inputs["connection"]["host"]
    admin = next(node.name for node in lab.nodes.values() if node.address == host)
    return admin, script_of(step), step.inputs["stdin"]


def refresh(lab: ControlPlaneLab, worker: int = 1) -> str:
    admin, script, stdin = token_step(lab, worker)
    ran = lab.run_step(lab.nodes[admin], script, stdin, timeout=SCRIPT_BOUND)
    assert ran.returncode == 0, f"the token step failed on {admin}:\n{ran.output}"
    return ran.stdout + ran.stderr


def cluster_info(lab: ControlPlaneLab) -> dict[str, str]:
    response = lab.request("GET", "/api/v1/namespaces/kube-public/configmaps/cluster-info", admin=False)
    assert response.status == 200, (response.status, response.body[:300])
    return dict(response.json()["data"])


# ----------------------------------------------------------------------------- (1) the control plane is up


def test_haproxy_marks_every_real_apiserver_up_and_the_programs_kubeconfig_works(cp_lab: ControlPlaneLab) -> None:
    servers = {plan.hostname: "UP" for plan in cp_lab.plan.control_planes}
    took = cp_lab.wait_backends(servers, timeout=30)
    report(f"HAProxy: every backend UP by /readyz ({took:.1f}s)")
    assert cp_lab.kubeconfig_server == f"https://{cp_lab.plan.vip}:{cp_lab.config.load_balancer.port}"
    version = cp_lab.request("GET", "/version")
    assert version.status == 200 and version.json()["gitVersion"] == f"v{VERSION}"
    namespaces = cp_lab.request("GET", "/api/v1/namespaces")
    assert namespaces.status == 200, "the program's admin credentials are refused through the VIP"
    review = cp_lab.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        body={"spec": {"resourceAttributes": {"verb": "*", "resource": "*", "group": "*"}}},
    )
    assert review.status == 201 and review.json()["status"]["allowed"] is True


# ----------------------------------------------------------------------------- (2) bootstrap signer


def test_bootstrap_signer_signs_cluster_info_for_the_programs_token(cp_lab: ControlPlaneLab) -> None:
    started = time.monotonic()
    key = f"jws-kubeconfig-{token_id(cp_lab)}"

    def signed() -> dict[str, str] | None:
        info = cluster_info(cp_lab)
        return info if key in info else None

    data = poll_until(
        signed,
        timeout=SIGNER_BOUND,
        interval=1,
        message="the bootstrap signer's signature in cluster-info",
    )
    report(f"cluster-info signed for the program's token after {time.monotonic() - started:.1f}s")
    kubeconfig = yaml.safe_load(data["kubeconfig"])
    assert kubeconfig["clusters"][0]["cluster"]["server"] == cp_lab.kubeconfig_server
    assert_one_valid_token(cp_lab)


# ----------------------------------------------------------------------------- (3) token refresh


def test_token_refresh_when_there_is_no_token(cp_lab: ControlPlaneLab) -> None:
    delete_token(cp_lab)
    assert token_secret(cp_lab) is None
    refresh(cp_lab)
    assert_one_valid_token(cp_lab)


def test_token_refresh_keeps_a_fresh_token(cp_lab: ControlPlaneLab) -> None:
    before = assert_one_valid_token(cp_lab)
    output = refresh(cp_lab)
    assert "already done" in output
    assert token_secret(cp_lab) == before


def test_token_refresh_with_23_hours_left(cp_lab: ControlPlaneLab) -> None:
    set_expiration(cp_lab, datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=23))
    refresh(cp_lab)
    assert_one_valid_token(cp_lab, at_least_hours=22.9)


def test_token_refresh_when_the_token_is_about_to_expire(cp_lab: ControlPlaneLab) -> None:
    set_expiration(cp_lab, datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=30))
    refresh(cp_lab)
    assert_one_valid_token(cp_lab)


def test_token_refresh_when_the_token_has_expired(cp_lab: ControlPlaneLab) -> None:
    set_expiration(cp_lab, datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1))
    refresh(cp_lab)
    assert_one_valid_token(cp_lab)


def test_three_token_refreshes_at_once(cp_lab: ControlPlaneLab) -> None:
    """Workers join in parallel: their token steps run on the same admin node at the same time."""
    set_expiration(cp_lab, datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=30))
    runs = []
    for worker in (1, 2, 3):
        admin, script, stdin = token_step(cp_lab, worker)
        runs.append((worker, cp_lab.spawn_step(cp_lab.nodes[admin], script, stdin, f"token-{worker}")))
    failures, outputs = [], []
    for worker, process in runs:
        code = process.wait(timeout=SCRIPT_BOUND)
        output = mask((cp_lab.work / f"token-{worker}.out").read_text())
        outputs.append(output.strip().splitlines()[-1:] or ["(no output)"])
        if code != 0:
            failures.append(f"worker-{worker}: exit {code}\n{output}")
    assert not failures, "\n".join(failures)
    assert_one_valid_token(cp_lab)
    report("three token steps at once: " + " | ".join(line for lines in outputs for line in lines))


# ----------------------------------------------------------------------------- (4) discovery


def _join_dry_run(cp_lab: ControlPlaneLab, documents: str, tag: str) -> tuple[int, str]:
    plan = cp_lab.plan.workers[0]
    node = cp_lab.nodes.get(plan.hostname) or cp_lab.add_node(plan)
    node.root.place({JOIN_CONFIG_PATH: (0o600, documents)})
    ran = cp_lab.kubeadm(
        node,
        "join",
        "--dry-run",
        "--config",
        JOIN_CONFIG_PATH,
        "--ignore-preflight-errors=all",
        "--skip-phases=preflight",
        "--v=1",
        timeout=DISCOVERY_BOUND,
    )
    (cp_lab.work / f"join-{tag}.out").write_text(ran.output)
    return ran.returncode, ran.output


def _with_hash(documents: str, value: str) -> str:
    join = yaml.safe_load(documents)
    join["discovery"]["bootstrapToken"]["caCertHashes"] = [value]
    # A refused CA is final at once; the bound only matters if kubeadm kept retrying.
    join.setdefault("timeouts", {})["discovery"] = "30s"
    return yaml.safe_dump(join)


def test_discovery_through_the_vip_with_the_programs_join_configuration(cp_lab: ControlPlaneLab) -> None:
    refresh(cp_lab)
    documents = join_documents(cp_lab.evaluation, cp_lab.plan.workers[0].hostname)
    code, output = _join_dry_run(cp_lab, documents, "worker")
    assert code == 0, output
    # kubeadm's own words once the JWS signature (token) and the CA pin (hash) both check out, via the VIP.
    endpoint = f"{cp_lab.plan.vip}:{cp_lab.config.load_balancer.port}"
    assert (
        "Cluster info signature and contents are valid and TLS certificate validates against pinned roots, "
        f'will use API Server "{endpoint}"'
    ) in output, output


def test_discovery_refuses_a_wrong_hash_and_a_foreign_ca(cp_lab: ControlPlaneLab) -> None:
    documents = join_documents(cp_lab.evaluation, cp_lab.plan.workers[0].hostname)
    foreign_key = cp_lab.evaluation.named("front-proxy-ca-key").outputs["publicKeyPem"]
    cases = {"wrong-hash": "sha256:" + "0" * 64, "foreign-ca": ca_cert_hash(foreign_key)}
    for tag, value in cases.items():
        started = time.monotonic()
        code, output = _join_dry_run(cp_lab, _with_hash(documents, value), tag)
        assert code != 0, f"{tag}: kubeadm join accepted it:\n{output}"
        assert "cluster CA found in cluster-info ConfigMap is invalid: none of the public keys" in output, output
        report(f"discovery with {tag} refused in {time.monotonic() - started:.1f}s")


def test_control_plane_join_document_yields_the_manifests_the_lab_runs(cp_lab: ControlPlaneLab) -> None:
    """`kubeadm join --dry-run` with cp-2's own JoinConfiguration: discovery through the VIP, then kubeadm derives
    cp-2's static pods from the cluster's ClusterConfiguration; they are the ones the lab runs on cp-2."""
    refresh(cp_lab)
    hostname = cp_lab.plan.control_planes[1].hostname
    node = cp_lab.nodes[hostname]
    node.root.place({JOIN_CONFIG_PATH: (0o600, join_documents(cp_lab.evaluation, hostname))})
    dry_run_dir = "/etc/kubernetes/tmp/kubeadm-ha-join-dry-run"
    ran = cp_lab.kubeadm(
        node,
        "join",
        "--dry-run",
        "--config",
        JOIN_CONFIG_PATH,
        "--skip-phases=preflight",
        "--v=1",
        timeout=DISCOVERY_BOUND,
        env={"KUBEADM_JOIN_DRYRUN_DIR": dry_run_dir},
    )
    (cp_lab.work / "join-control-plane.out").write_text(ran.output)
    assert ran.returncode == 0, ran.output
    assert "TLS certificate validates against pinned roots" in ran.output, ran.output
    for component in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        derived = yaml.safe_load(node.root.read(f"{dry_run_dir}/{component}.yaml"))["spec"]["containers"][0]
        assert derived["command"] == cp_lab.manifest_command(node, component), component


# ----------------------------------------------------------------------------- (5) LB failover


def test_dead_apiserver_is_taken_out_and_traffic_keeps_flowing(cp_lab: ControlPlaneLab) -> None:
    victim = cp_lab.plan.control_planes[0].hostname
    node = cp_lab.nodes[victim]
    node.processes["kube-apiserver"].stop(signal.SIGKILL)
    took = cp_lab.wait_backends({victim: "DOWN"}, timeout=20)
    report(f"{victim}'s kube-apiserver killed: HAProxy marked it DOWN after {took:.1f}s")
    statuses = [cp_lab.request("GET", "/api/v1/namespaces/default").status for _ in range(12)]
    assert statuses == [200] * 12
    cp_lab.start_component(node, "kube-apiserver")
    cp_lab.wait_apiserver_ready(victim, timeout=240)
    took = cp_lab.wait_backends({victim: "UP"}, timeout=30)
    report(f"{victim}'s kube-apiserver back: UP after {took:.1f}s")


def test_dead_haproxy_moves_the_vip_and_the_api_answers(cp_lab: ControlPlaneLab) -> None:
    holder = cp_lab.wait_vip_holder(timeout=10)
    node = cp_lab.nodes[holder]
    node.processes["haproxy"].stop(signal.SIGKILL)
    started = time.monotonic()
    new = cp_lab.wait_vip_holder(timeout=20, exclude=holder)
    poll_until(
        lambda: cp_lab.request("GET", "/readyz", admin=False, timeout=2).status == 200,
        timeout=20,
        interval=0.3,
        message="the API through the VIP after failover",
    )
    report(f"HAProxy on {holder} killed: VIP on {new}, API answering after {time.monotonic() - started:.1f}s")
    files = step_files(cp_lab.evaluation, f"{holder}-configure-lb")
    assert files  # the same configuration comes back
    node.processes["haproxy"] = cp_lab.lab.spawn(
        node.namespace,
        [cp_lab.programs["haproxy"], "-db", "-f", str(cp_lab.work / f"{holder}-haproxy.cfg")],
        name=f"haproxy-{holder}-again",
    )


# ----------------------------------------------------------------------------- (6) external etcd loss


def test_losing_etcd_members(cp_lab: ControlPlaneLab) -> None:
    assert cp_lab.etcd_spec is not None
    members = [member.name for member in cp_lab.etcd_spec.members]
    acked = []

    def write(index: int) -> bool:
        name = f"kubeadm-ha-probe-{index}"
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"n": str(index)}}
        try:
            ok = cp_lab.request("POST", "/api/v1/namespaces/default/configmaps", body=body, timeout=8).status == 201
        except OSError:
            ok = False
        if ok:
            acked.append(name)
        return ok

    counter = iter(range(1000))
    assert write(next(counter))
    cp_lab.nodes[members[0]].processes["etcd"].stop(signal.SIGKILL)
    poll_until(lambda: write(next(counter)), timeout=30, interval=0.5, message="a write with one etcd member gone")
    report(f"etcd {members[0]} killed: the API still writes")

    cp_lab.nodes[members[1]].processes["etcd"].stop(signal.SIGKILL)
    started = time.monotonic()
    cps = {plan.hostname: "DOWN" for plan in cp_lab.plan.control_planes}
    took = cp_lab.wait_backends(cps, timeout=90)
    report(f"etcd {members[1]} killed too: every API server unready, HAProxy took all out after {took:.1f}s")
    assert not write(next(counter))

    cp_lab.start_etcd_member(members[0])
    started = time.monotonic()
    took = cp_lab.wait_backends({plan.hostname: "UP" for plan in cp_lab.plan.control_planes}, timeout=120)
    poll_until(lambda: write(next(counter)), timeout=30, interval=0.5, message="a write after quorum returned")
    report(
        f"etcd {members[0]} back: API servers ready after {took:.1f}s, writes after {time.monotonic() - started:.1f}s"
    )
    for name in acked:
        response = cp_lab.request("GET", f"/api/v1/namespaces/default/configmaps/{name}")
        assert response.status == 200, name
    cp_lab.start_etcd_member(members[1])
    poll_until(cp_lab.etcd_healthy, timeout=60, interval=1, message="all etcd members healthy again")
    assert json.dumps(acked)


def test_lab_left_nothing_on_the_host() -> None:
    assert not Path("/etc/kubernetes/manifests").exists() or not any(Path("/etc/kubernetes/manifests").iterdir())
