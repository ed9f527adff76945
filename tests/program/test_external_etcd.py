"""The external etcd topology in the real program under the mock runtime: prod, and its scaling runs.

Assertions are on what the program registers: the members' VMs and steps, their order, the
certificates inside the (secret) stdin bundles, what kubeadm is told, and how a changed member
count turns into `member add` and `member remove`.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from components.etcd import plan_membership
from model.addressing import plan_addresses
from model.offsets import mac_for
from model.previous import PreviousDeployment
from model.rules import ConfigError
from model.stack import parse_config
from render.etcd import (
    MANIFEST_PATH,
    STAGED_MANIFEST_PATH,
    EtcdClusterSpec,
    etcd_member_flags,
)
from tools.offline import UNKNOWN, Evaluation, Registration, evaluate, load_stack_config
from tools.plan import bundle_by_path, script_of

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "command:remote:Command"
DOMAIN = "libvirt:index/domain:Domain"
MEMBERS = ["prod-etcd-1", "prod-etcd-2", "prod-etcd-3"]
ADDRESSES = {f"prod-etcd-{n}": f"10.17.5.{20 + n}" for n in range(1, 8)}
ETCD_PKI = "/etc/kubernetes/pki/etcd"
RUNNING = {"etcdTopology": "external", "kubernetesVersion": "1.37.2"}


def prod_config(**etcd: Any) -> dict[str, Any]:
    config = load_stack_config(ROOT, "prod")
    config["kubeadm-ha:etcd"] = {**config["kubeadm-ha:etcd"], **etcd}
    return config


@cache
def prod() -> Evaluation:
    return evaluate("prod", project_dir=ROOT)


@cache
def scaled(replicas: int, initial: tuple[str, ...], last_members: tuple[str, ...] | None) -> Evaluation:
    previous: dict[str, Any] = {**RUNNING, "etcdInitialMembers": list(initial)}
    if last_members is not None:
        previous["etcdMembers"] = list(last_members)
    return evaluate("prod", project_dir=ROOT, config=prod_config(replicas=replicas), previous_outputs=previous)


def members(n: int) -> tuple[str, ...]:
    return tuple(f"prod-etcd-{i}" for i in range(1, n + 1))


def member_step(ev: Evaluation, name: str) -> Registration:
    return ev.named(f"{name}-etcd-member")


def manifest_of(ev: Evaluation, name: str) -> dict[str, Any]:
    mode, text = bundle_by_path(member_step(ev, name).inputs["stdin"])[STAGED_MANIFEST_PATH]
    assert mode == 0o600
    return yaml.safe_load(text)


def flag(manifest: dict[str, Any], name: str) -> str:
    command = manifest["spec"]["containers"][0]["command"]
    (value,) = [word.split("=", 1)[1] for word in command if word.startswith(f"--{name}=")]
    return value


def certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def etcd_ca(ev: Evaluation) -> x509.Certificate:
    return certificate(ev.named("etcd-ca").outputs["certPem"])


def assert_pair(cert_pem: str, key_pem: str) -> None:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert key.public_key().public_numbers() == certificate(cert_pem).public_key().public_numbers()  # type: ignore[union-attr]


def extended_usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def spec_for(config: dict[str, Any], previous: dict[str, Any]) -> EtcdClusterSpec:
    raw = {key.removeprefix("kubeadm-ha:"): value for key, value in config.items()}
    parsed = parse_config(raw, stack="prod")
    return plan_membership(parsed, plan_addresses(parsed), PreviousDeployment(previous))


# ----------------------------------------------------------------------------- prod, a new stack


def test_prod_has_three_etcd_member_vms() -> None:
    ev = prod()
    names = sorted(domain.inputs["name"] for domain in ev.by_type(DOMAIN) if "-etcd-" in domain.inputs["name"])
    assert names == MEMBERS
    cluster = ev.named("etcd")
    assert cluster.type == "kubeadm-ha:index:EtcdCluster"
    vms = [r for r in ev.children(cluster) if r.type == "kubeadm-ha:index:Vm"]
    assert sorted(vm.name for vm in vms) == MEMBERS
    nodes = ev.outputs["nodes"].value
    assert {name: nodes[name] for name in MEMBERS} == {
        name: {
            "address": ADDRESSES[name],
            "mac": mac_for(ipaddress.IPv4Address(ADDRESSES[name])),
            "role": "etcd",
            "hypervisor": "local",
        }
        for name in MEMBERS
    }
    # Sized from etcd.cpus/memoryMiB, not from the control planes.
    domain = next(d for d in ev.by_type(DOMAIN) if d.inputs["name"] == "prod-etcd-1")
    assert (domain.inputs["vcpu"], domain.inputs["memory"]) == (2, 4096)


def test_order_vm_then_member_then_health_then_kubeadm_init() -> None:
    ev = prod()
    health = ev.named("prod-etcd-1-etcd-health")
    init = ev.named("prod-cp-1-kubeadm-init")
    for index, name in enumerate(MEMBERS):
        step = member_step(ev, name)
        assert ev.depends_on(step, f"{name}-ready")
        assert ev.depends_on(step, f"{name}-domain")
        assert ev.depends_on(health, step)
        if index:
            # The chain: one member's step at a time (and, on delete, in reverse).
            assert ev.depends_on(step, member_step(ev, MEMBERS[index - 1]))
        assert not ev.depends_on(step, "prod-cp-1-place-pki")
    assert ev.depends_on(init, health)
    for cp in ("prod-cp-1", "prod-cp-2", "prod-cp-3"):
        assert not ev.depends_on(health, f"{cp}-ready")
    assert ev.depends_on("prod-cp-3-kubeadm-join", health)


def test_init_configuration_points_kubeadm_at_the_external_members() -> None:
    ev = prod()
    _, content = bundle_by_path(ev.named("prod-cp-1-kubeadm-init").inputs["stdin"])[
        "/etc/kubernetes/kubeadm-ha/init.yaml"
    ]
    cluster = next(doc for doc in yaml.safe_load_all(content) if doc["kind"] == "ClusterConfiguration")
    assert cluster["etcd"] == {
        "external": {
            "endpoints": [f"https://{ADDRESSES[name]}:2379" for name in MEMBERS],
            "caFile": f"{ETCD_PKI}/ca.crt",
            "certFile": "/etc/kubernetes/pki/apiserver-etcd-client.crt",
            "keyFile": "/etc/kubernetes/pki/apiserver-etcd-client.key",
        }
    }


def test_control_planes_get_the_etcd_client_pair_but_not_the_etcd_ca_key() -> None:
    ev = prod()
    ca = etcd_ca(ev)
    for cp in ("prod-cp-1", "prod-cp-2", "prod-cp-3"):
        files = bundle_by_path(ev.named(f"{cp}-place-pki").inputs["stdin"])
        assert f"{ETCD_PKI}/ca.key" not in files
        assert not any(path.startswith(ETCD_PKI) and path != f"{ETCD_PKI}/ca.crt" for path in files)
        assert files[f"{ETCD_PKI}/ca.crt"] == (0o644, ev.named("etcd-ca").outputs["certPem"])
        cert_mode, cert_pem = files["/etc/kubernetes/pki/apiserver-etcd-client.crt"]
        key_mode, key_pem = files["/etc/kubernetes/pki/apiserver-etcd-client.key"]
        assert (cert_mode, key_mode) == (0o644, 0o600)
        client = certificate(cert_pem)
        client.verify_directly_issued_by(ca)
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-apiserver-etcd-client"
        assert extended_usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        assert_pair(cert_pem, key_pem)
        # The guard knows the new public file, and every key it expects is one that is placed.
        script = script_of(ev.named(f"{cp}-place-pki"))
        assert "[ -s /etc/kubernetes/pki/apiserver-etcd-client.key ]" in script
        assert "/etc/kubernetes/pki/etcd/ca.key" not in script


def test_each_member_gets_its_own_certificates_and_the_shared_client() -> None:
    ev = prod()
    ca = etcd_ca(ev)
    for name in MEMBERS:
        files = bundle_by_path(member_step(ev, name).inputs["stdin"])
        assert set(files) == {
            *(
                f"{ETCD_PKI}/{base}.{ext}"
                for base in ("server", "peer", "healthcheck-client")
                for ext in ("crt", "key")
            ),
            f"{ETCD_PKI}/ca.crt",
            STAGED_MANIFEST_PATH,
        }
        assert f"{ETCD_PKI}/ca.key" not in files
        for path, (mode, content) in files.items():
            assert mode == (0o600 if path.endswith(".key") or path == STAGED_MANIFEST_PATH else 0o644), path
            assert ("PRIVATE KEY" in content) == path.endswith(".key"), path
        for kind in ("server", "peer"):
            cert = certificate(files[f"{ETCD_PKI}/{kind}.crt"][1])
            cert.verify_directly_issued_by(ca)
            assert_pair(files[f"{ETCD_PKI}/{kind}.crt"][1], files[f"{ETCD_PKI}/{kind}.key"][1])
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert set(sans.get_values_for_type(x509.DNSName)) == {name, "localhost"}
            assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
                ADDRESSES[name],
                "127.0.0.1",
                "::1",
            }
            assert extended_usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        health = certificate(files[f"{ETCD_PKI}/healthcheck-client.crt"][1])
        health.verify_directly_issued_by(ca)
        assert health.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-etcd-healthcheck-client"
        assert extended_usages(health) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    # Per-member keys are per member.
    keys = {bundle_by_path(member_step(ev, name).inputs["stdin"])[f"{ETCD_PKI}/server.key"][1] for name in MEMBERS}
    assert len(keys) == len(MEMBERS)


def test_manifest_runs_kubeadms_etcd_with_the_flags_of_the_pure_function() -> None:
    ev = prod()
    spec = spec_for(load_stack_config(ROOT, "prod"), {})
    for name in MEMBERS:
        manifest = manifest_of(ev, name)
        container = manifest["spec"]["containers"][0]
        assert container["image"] == "registry.k8s.io/etcd:3.7.0-0"
        assert container["command"] == ["etcd", *etcd_member_flags(spec.member(name), spec)]
        assert manifest["spec"]["hostNetwork"] is True
        assert flag(manifest, "initial-cluster-state") == "new"
        assert flag(manifest, "initial-cluster") == ",".join(f"{m}=https://{ADDRESSES[m]}:2380" for m in MEMBERS)
        assert flag(manifest, "advertise-client-urls") == f"https://{ADDRESSES[name]}:2379"
        # The script holds the manifest's digest (not the manifest), and installs it from the staged copy.
        script = script_of(member_step(ev, name))
        assert MANIFEST_PATH in script and "member add" not in script
    assert ev.outputs["etcdInitialMembers"].value == MEMBERS
    assert ev.outputs["etcdMembers"].value == MEMBERS
    assert ev.outputs["etcdTopology"].value == "external"


def test_the_maintenance_keys_reach_every_members_flags() -> None:
    """etcd.maintenance (quota, compaction) reaches each external member's command, as stacked etcd gets it from
    kubeadm's etcd.local.extraArgs; unset, etcd_args' defaults (4 GiB, compaction left to kube-apiserver)."""
    keys = ("quota-backend-bytes", "auto-compaction-mode", "auto-compaction-retention")
    maintenance = {"quotaBackendBytes": 2**31, "autoCompactionMode": "revision", "autoCompactionRetention": "5000"}
    ev = evaluate("prod", project_dir=ROOT, config=prod_config(maintenance=maintenance))
    for name in MEMBERS:
        assert tuple(flag(manifest_of(ev, name), key) for key in keys) == ("2147483648", "revision", "5000")
        assert tuple(flag(manifest_of(prod(), name), key) for key in keys) == (str(2**32), "periodic", "0")


def test_member_secrets_only_on_stdin_and_host_keys_pinned() -> None:
    ev = prod()
    for name in MEMBERS:
        for step in (member_step(ev, name), ev.named(f"{name}-ready")):
            assert step.inputs["connection"]["host"] == ADDRESSES[name]
            host_key = ev.named(f"{name}-ssh-host-key").outputs["publicKeyOpenssh"].strip()
            assert step.inputs["connection"]["hostKey"] == host_key
        step = member_step(ev, name)
        assert "stdin" in step.secret_inputs
        assert {"stdout", "stderr"} <= set(step.additional_secret_outputs)
        assert "create" not in step.secret_inputs and "delete" not in step.secret_inputs
        for field in ("create", "delete"):
            assert "PRIVATE KEY" not in step.inputs[field]
        assert "environment" not in step.inputs
    health = ev.named("prod-etcd-1-etcd-health")
    assert "stdin" not in health.inputs
    assert health.inputs["connection"]["host"] == ADDRESSES["prod-etcd-1"]


def test_health_step_checks_every_member_bounded_with_the_healthcheck_client() -> None:
    script = script_of(prod().named("prod-etcd-1-etcd-health"))
    for name in MEMBERS:
        assert f"member_healthy https://{ADDRESSES[name]}:2379 || unhealthy+=('{name} " in script
    assert "--cert=/etc/kubernetes/pki/etcd/healthcheck-client.crt" in script
    assert "timeout 20 etcdctl" in script and "deadline=$((SECONDS + 300))" in script


def test_every_member_step_can_remove_its_member() -> None:
    ev = prod()
    for name in MEMBERS:
        delete = script_of(member_step(ev, name), "delete")
        assert "member remove" in delete and f"-v me={name}" in delete
        assert "timeout 20 etcdctl" in delete
        assert f"rm -f {MANIFEST_PATH}" in delete


def test_preview_evaluates() -> None:
    preview = evaluate("prod", project_dir=ROOT, preview=True)
    assert sorted(r.urn for r in preview.resources) == sorted(r.urn for r in prod().resources)
    step = preview.named("prod-etcd-2-etcd-member")
    assert step.inputs["stdin"] is UNKNOWN and "stdin" in step.secret_inputs
    assert preview.outputs["etcdInitialMembers"].value == MEMBERS


# ----------------------------------------------------------------------------- scaling


def test_scale_up_adds_members_four_then_five() -> None:
    ev = scaled(5, members(3), None)
    for name in ("prod-etcd-4", "prod-etcd-5"):
        manifest = manifest_of(ev, name)
        assert flag(manifest, "initial-cluster-state") == "existing"
        index = int(name.rsplit("-", 1)[1])
        assert flag(manifest, "initial-cluster") == ",".join(
            f"prod-etcd-{i}=https://{ADDRESSES[f'prod-etcd-{i}']}:2380" for i in range(1, index + 1)
        )
        script = script_of(member_step(ev, name))
        add = re.search(r"kha_etcdctl --endpoints=(\S+) member add (\S+) --peer-urls=(\S+)", script)
        assert add, script
        assert add.group(1).split(",") == [f"https://{ADDRESSES[f'prod-etcd-{i}']}:2379" for i in range(1, index)]
        assert (add.group(2), add.group(3)) == (name, f"https://{ADDRESSES[name]}:2380")
        # Every existing member healthy before it is added (bounded, retried), itself healthy before the next one.
        adding = script.index(f"kha_wait 300 'the etcd cluster to accept {name}' add_member")
        assert script.index("kha_wait 300 'etcd member prod-etcd-1 to be healthy before adding") < adding
        assert script.rindex(f"member_healthy https://{ADDRESSES[name]}:2379") > adding
    assert ev.depends_on(member_step(ev, "prod-etcd-5"), member_step(ev, "prod-etcd-4"))
    assert not ev.depends_on(member_step(ev, "prod-etcd-4"), member_step(ev, "prod-etcd-5"))
    assert ev.depends_on("prod-etcd-1-etcd-health", member_step(ev, "prod-etcd-5"))
    # The bootstrapping members are untouched: same script, same bundle, so nothing restarts them.
    for name in MEMBERS:
        assert member_step(ev, name).inputs == member_step(prod(), name).inputs
        assert flag(manifest_of(ev, name), "initial-cluster-state") == "new"
    assert ev.outputs["etcdInitialMembers"].value == MEMBERS
    assert ev.outputs["etcdMembers"].value == list(members(5))
    _, content = bundle_by_path(ev.named("prod-cp-1-kubeadm-init").inputs["stdin"])[
        "/etc/kubernetes/kubeadm-ha/init.yaml"
    ]
    cluster = next(doc for doc in yaml.safe_load_all(content) if doc["kind"] == "ClusterConfiguration")
    assert len(cluster["etcd"]["external"]["endpoints"]) == 5


def test_scale_down_drops_the_highest_members_and_keeps_the_rest_unchanged() -> None:
    ev = scaled(3, members(3), members(5))
    names = {r.name for r in ev.resources}
    assert not any(name.startswith(("prod-etcd-4", "prod-etcd-5")) for name in names)
    for name in MEMBERS:
        step = member_step(ev, name)
        assert "member remove" in script_of(step, "delete")
        assert step.inputs == member_step(prod(), name).inputs
    health = script_of(ev.named("prod-etcd-1-etcd-health"))
    assert "10.17.5.24" not in health and "10.17.5.25" not in health
    assert ev.outputs["etcdMembers"].value == MEMBERS


def test_a_cluster_bootstrapped_with_five_keeps_its_flags_and_re_adds_returning_members() -> None:
    # Bootstrapped with 5, scaled to 3: members 1-3 keep their 5-member bootstrap flags (no restart).
    down = scaled(3, members(5), members(5))
    five = ",".join(f"prod-etcd-{i}=https://{ADDRESSES[f'prod-etcd-{i}']}:2380" for i in range(1, 6))
    for name in MEMBERS:
        manifest = manifest_of(down, name)
        assert (flag(manifest, "initial-cluster-state"), flag(manifest, "initial-cluster")) == ("new", five)
    assert down.outputs["etcdInitialMembers"].value == list(members(5))
    # Back to 5: the removed members 4 and 5 are new members now, added one at a time.
    up = scaled(5, members(5), members(3))
    for name in ("prod-etcd-4", "prod-etcd-5"):
        assert flag(manifest_of(up, name), "initial-cluster-state") == "existing"
        assert "member add" in script_of(member_step(up, name))
    assert up.outputs["etcdInitialMembers"].value == list(members(5))


@pytest.mark.parametrize("replicas", [2, 4, 6])
def test_even_member_counts_are_refused_with_the_reason(replicas: int) -> None:
    with pytest.raises(ConfigError) as caught:
        evaluate("prod", project_dir=ROOT, config=prod_config(replicas=replicas))
    (problem,) = [p for p in caught.value.problems if p.path == "etcd.replicas"]
    assert "even" in problem.rule


@pytest.mark.parametrize("replicas", [1, 9])
def test_member_counts_outside_three_to_seven_are_refused(replicas: int) -> None:
    with pytest.raises(ConfigError) as caught:
        evaluate("prod", project_dir=ROOT, config=prod_config(replicas=replicas))
    assert "etcd.replicas" in {p.path for p in caught.value.problems}


def test_topology_change_on_a_running_cluster_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        evaluate("prod", project_dir=ROOT, previous_outputs={**RUNNING, "etcdTopology": "stacked"})
    (problem,) = caught.value.problems
    assert problem.path == "etcd.topology" and "migrat" in problem.rule
