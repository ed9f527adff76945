"""The real program (`__main__.py`) under Pulumi's mock runtime, for every stack file.

Assertions are on the registered resource graph: what exists, in which order it
runs, what is secret, how nodes are reached, and what kubeadm is told.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from model.rules import ConfigError
from tools.offline import UNKNOWN, Evaluation, Registration, evaluate
from tools.plan import bundle_by_path, script_of

ROOT = Path(__file__).resolve().parents[2]
STACKS = ["dev", "staging", "prod"]
EXPECTED_COUNTS = {"dev": (1, 3, 0, 1), "staging": (2, 3, 0, 2), "prod": (2, 3, 3, 3)}  # lb, cp, etcd, worker
TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
COMMAND = "command:remote:Command"
DOMAIN = "libvirt:index/domain:Domain"


@cache
def evaluated(stack: str) -> Evaluation:
    return evaluate(stack, project_dir=ROOT)


def commands(ev: Evaluation) -> list[Registration]:
    return ev.by_type(COMMAND)


def step(ev: Evaluation, name: str) -> Registration:
    return ev.named(name)


def kubeadm_documents(ev: Evaluation, name: str) -> dict[str, dict[str, Any]]:
    """Every kubeadm document the step delivers (the first control plane gets both init and join documents)."""
    documents: dict[str, dict[str, Any]] = {}
    for _mode, content in bundle_by_path(step(ev, name).inputs["stdin"]).values():
        documents.update({doc["kind"]: doc for doc in yaml.safe_load_all(content)})
    return documents


def hostnames(ev: Evaluation, role: str) -> list[str]:
    nodes = ev.outputs["nodes"].value
    return sorted(
        (name for name, node in nodes.items() if node["role"] == role), key=lambda n: int(n.rsplit("-", 1)[1])
    )


@pytest.mark.parametrize("stack", STACKS)
def test_vm_counts_per_role(stack: str) -> None:
    ev = evaluated(stack)
    roles = Counter(domain.inputs["name"].rsplit("-", 2)[1] for domain in ev.by_type(DOMAIN))
    lbs, cps, etcds, workers = EXPECTED_COUNTS[stack]
    assert roles == Counter({"lb": lbs, "cp": cps, "etcd": etcds, "worker": workers})


@pytest.mark.parametrize("stack", STACKS)
def test_join_order(stack: str) -> None:
    ev = evaluated(stack)
    cps = hostnames(ev, "cp")
    init = step(ev, f"{cps[0]}-kubeadm-init")
    cni = step(ev, f"{cps[0]}-cni-calico")
    # The LB is configured and the PKI placed before init.
    for lb in hostnames(ev, "lb"):
        assert ev.depends_on(init, f"{lb}-configure-lb")
    assert ev.depends_on(init, f"{cps[0]}-place-pki")
    assert ev.depends_on(cni, init)
    # Control-plane joins: each after the previous, after init and the CNI, with its PKI placed first.
    previous = cni
    for cp in cps[1:]:
        join = step(ev, f"{cp}-kubeadm-join")
        assert ev.depends_on(join, previous)
        assert ev.depends_on(join, f"{cp}-place-pki")
        previous = join
    # Workers join after init and the CNI, in parallel, not behind any control-plane join.
    worker_joins = [step(ev, f"{worker}-kubeadm-join") for worker in hostnames(ev, "worker")]
    for join in worker_joins:
        assert ev.depends_on(join, init) and ev.depends_on(join, cni)
        for cp in cps[1:]:
            assert not ev.depends_on(join, f"{cp}-kubeadm-join")
        for other in worker_joins:
            assert other is join or not ev.depends_on(join, other)
    # Nothing runs kubeadm before its VM has finished cloud-init.
    for cp in cps:
        assert ev.depends_on(f"{cp}-place-pki", f"{cp}-ready")


@pytest.mark.parametrize("stack", STACKS)
def test_every_child_has_a_component_parent(stack: str) -> None:
    ev = evaluated(stack)
    stack_urn = ev.stack_urn
    top_level = {r.type for r in ev.resources if r.parent == stack_urn}
    assert top_level <= {
        "kubeadm-ha:index:ClusterPki",
        "kubeadm-ha:index:Hypervisor",
        "kubeadm-ha:index:LoadBalancer",
        "kubeadm-ha:index:EtcdCluster",
        "kubeadm-ha:index:EtcdMaintenance",
        "kubeadm-ha:index:EtcdBackups",
        "kubeadm-ha:index:CertificateRenewal",
        "kubeadm-ha:index:ControlPlaneSettings",
        "kubeadm-ha:index:SecretsEncryption",
        "kubeadm-ha:index:NodeFiles",
        "kubeadm-ha:index:KubeletServingApproval",
        "kubeadm-ha:index:ControlPlaneNode",
        "kubeadm-ha:index:WorkerPool",
    }


@pytest.mark.parametrize("stack", STACKS)
def test_outputs(stack: str) -> None:
    ev = evaluated(stack)
    outputs = ev.outputs
    assert outputs["kubeconfig"].secret and outputs["sshPrivateKey"].secret
    assert not outputs["apiEndpoint"].secret and not outputs["nodes"].secret
    config = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    vip, port = config["kubeadm-ha:loadBalancer"]["vip"], config["kubeadm-ha:loadBalancer"]["port"]
    assert outputs["apiEndpoint"].value == f"https://{vip}:{port}"
    assert outputs["sshUser"].value == "kube"
    kubeconfig = yaml.safe_load(outputs["kubeconfig"].value)
    cluster = kubeconfig["clusters"][0]["cluster"]
    assert cluster["server"] == f"https://{vip}:{port}"
    ca = x509.load_pem_x509_certificate(base64.b64decode(cluster["certificate-authority-data"]))
    client = x509.load_pem_x509_certificate(base64.b64decode(kubeconfig["users"][0]["user"]["client-certificate-data"]))
    client.verify_directly_issued_by(ca)
    assert ca.subject.rfc4514_string().startswith("OU=") or "CN=kubernetes" in ca.subject.rfc4514_string()
    assert "O=kubeadm:cluster-admins" in client.subject.rfc4514_string()
    key = serialization.load_pem_private_key(
        base64.b64decode(kubeconfig["users"][0]["user"]["client-key-data"]), password=None
    )
    assert key.public_key().public_numbers() == client.public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("stack", STACKS)
def test_secrets_travel_only_on_stdin(stack: str) -> None:
    ev = evaluated(stack)
    token = kubeadm_documents(ev, f"{hostnames(ev, 'cp')[0]}-kubeadm-init")["InitConfiguration"]["bootstrapTokens"][0][
        "token"
    ]
    private_keys = [key.outputs["privateKeyPem"] for key in ev.by_type("tls:index/privateKey:PrivateKey")] + [
        key.outputs["privateKeyOpenssh"] for key in ev.by_type("tls:index/privateKey:PrivateKey")
    ]
    for command in commands(ev):
        visible = json.dumps({k: v for k, v in command.inputs.items() if k not in command.secret_inputs})
        assert "PRIVATE KEY" not in visible, command.name
        assert token not in visible, command.name
        for field in ("create", "update", "delete"):
            text = command.inputs.get(field) or ""
            assert "PRIVATE KEY" not in text and token not in text, (command.name, field)
            assert not any(key.strip() in text for key in private_keys if key)
        assert "environment" not in command.inputs
        if command.name.endswith(("-configure-lb", "-control-plane-config")):
            # Public configs: readable in diffs, and holding nothing secret.
            assert "stdin" not in command.secret_inputs
            assert "PRIVATE KEY" not in command.inputs["stdin"] and token not in command.inputs["stdin"]
        elif "stdin" in command.inputs:
            assert "stdin" in command.secret_inputs, command.name
            assert {"stdout", "stderr"} <= set(command.additional_secret_outputs), command.name
    for disk in ev.by_type("libvirt:index/cloudInitDisk:CloudInitDisk"):
        # The provider logs all three documents (render/hostkey_disk.py): none holds a secret.
        documents = json.dumps([disk.inputs["userData"], disk.inputs["metaData"], disk.inputs["networkConfig"]])
        assert "PRIVATE KEY" not in documents and token not in documents
        assert not any(key.strip() in documents for key in private_keys if key)


@pytest.mark.parametrize("stack", STACKS)
def test_secret_steps_are_exactly_the_ones_that_need_secrets(stack: str) -> None:
    ev = evaluated(stack)
    names = sorted(ev.outputs["nodes"].value, key=len, reverse=True)

    def kind(command: Registration) -> str:
        hostname = next(name for name in names if command.name.startswith(name + "-"))
        return command.name.removeprefix(hostname + "-")

    secret_kinds = {kind(command) for command in commands(ev) if "stdin" in command.secret_inputs}
    external_etcd = any(node["role"] == "etcd" for node in ev.outputs["nodes"].value.values())
    encryption = {"encryption-add", "encryption-promote", "encryption-drop"}
    assert secret_kinds == {"place-pki", "kubeadm-init", "kubeadm-join", "join-token", *encryption} | (
        {"etcd-member"} if external_etcd else set()
    )


@pytest.mark.parametrize("stack", STACKS)
def test_every_step_pins_its_nodes_host_key(stack: str) -> None:
    ev = evaluated(stack)
    addresses = {name: node["address"] for name, node in ev.outputs["nodes"].value.items()}
    host_keys = {
        key.name.removesuffix("-ssh-host-key"): key
        for key in ev.by_type("tls:index/privateKey:PrivateKey")
        if key.name.endswith("-ssh-host-key")
    }
    assert set(host_keys) == set(addresses)
    by_address = {address: name for name, address in addresses.items()}
    roles = {name: node["role"] for name, node in ev.outputs["nodes"].value.items()}
    for command in commands(ev):
        subject = next(name for name in sorted(addresses, key=len, reverse=True) if command.name.startswith(name + "-"))
        connection = command.inputs["connection"]
        reached = by_address[connection["host"]]
        if command.name.endswith(("-join-token", "-membership", "-node-removal")):
            # Steps about a node that need admin.conf run on another control plane.
            assert roles[reached] == "cp" and reached != subject, command.name
        else:
            assert reached == subject, command.name
        assert connection["hostKey"] == host_keys[reached].outputs["publicKeyOpenssh"].strip()
        assert connection["hostKey"].startswith("ssh-ed25519 ")
        assert connection["user"] == "kube"
    # ...and the VM is booted with exactly that host key.
    for disk in ev.by_type("libvirt:index/cloudInitDisk:CloudInitDisk"):
        hostname = disk.name.removesuffix("-cloud-init")
        user_data = yaml.safe_load(disk.inputs["userData"])
        assert user_data["ssh_keys"]["ed25519_public"] == host_keys[hostname].outputs["publicKeyOpenssh"].strip()
        written = ev.named(f"{hostname}-host-key-disk")  # its private half, on the node's key disk
        assert written.inputs["stdin"].strip() == host_keys[hostname].outputs["privateKeyOpenssh"].strip()
        operator = ev.named("operator-ssh-key").outputs["publicKeyOpenssh"].strip()
        assert operator in user_data["users"][0]["ssh_authorized_keys"]


@pytest.mark.parametrize("stack", STACKS)
def test_kubeadm_values(stack: str) -> None:
    ev = evaluated(stack)
    cps = hostnames(ev, "cp")
    nodes = ev.outputs["nodes"].value
    vip_port = ev.outputs["apiEndpoint"].value.removeprefix("https://")
    init = kubeadm_documents(ev, f"{cps[0]}-kubeadm-init")
    cluster = init["ClusterConfiguration"]
    token = init["InitConfiguration"]["bootstrapTokens"][0]["token"]
    assert TOKEN.fullmatch(token)
    assert cluster["controlPlaneEndpoint"] == vip_port
    assert vip_port.split(":")[0] in cluster["apiServer"]["certSANs"]
    assert init["InitConfiguration"]["localAPIEndpoint"]["advertiseAddress"] == nodes[cps[0]]["address"]

    ca_pem = ev.named("cluster-ca").outputs["certPem"]
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected_hash = "sha256:" + hashlib.sha256(spki).hexdigest()
    joiners = [(cp, True) for cp in cps[1:]] + [(worker, False) for worker in hostnames(ev, "worker")]
    for hostname, control_plane in joiners:
        join = kubeadm_documents(ev, f"{hostname}-kubeadm-join")["JoinConfiguration"]
        discovery = join["discovery"]["bootstrapToken"]
        assert discovery == {"apiServerEndpoint": vip_port, "token": token, "caCertHashes": [expected_hash]}
        assert ("controlPlane" in join) is control_plane
        if control_plane:
            assert join["controlPlane"]["localAPIEndpoint"]["advertiseAddress"] == nodes[hostname]["address"]
            assert "certificateKey" not in join["controlPlane"]


@pytest.mark.parametrize("stack", STACKS)
def test_shared_pki_is_placed_with_private_keys_0600(stack: str) -> None:
    ev = evaluated(stack)
    # With external etcd the etcd CA key stays off the control planes; the API server's etcd client pair goes on.
    external_etcd = bool(hostnames(ev, "etcd"))
    expected_keys = {
        "/etc/kubernetes/pki/ca.key",
        "/etc/kubernetes/pki/sa.key",
        "/etc/kubernetes/pki/front-proxy-ca.key",
        "/etc/kubernetes/pki/apiserver-etcd-client.key" if external_etcd else "/etc/kubernetes/pki/etcd/ca.key",
    }
    for cp in hostnames(ev, "cp"):
        files = bundle_by_path(step(ev, f"{cp}-place-pki").inputs["stdin"])
        assert set(files) == expected_keys | {
            "/etc/kubernetes/pki/ca.crt",
            "/etc/kubernetes/pki/sa.pub",
            "/etc/kubernetes/pki/front-proxy-ca.crt",
            "/etc/kubernetes/pki/etcd/ca.crt",
            *(["/etc/kubernetes/pki/apiserver-etcd-client.crt"] if external_etcd else []),
        }
        for path, (mode, content) in files.items():
            assert mode == (0o600 if path in expected_keys else 0o644), path
            assert ("PRIVATE KEY" in content) == (path in expected_keys)
        assert files["/etc/kubernetes/pki/ca.crt"][1] == ev.named("cluster-ca").outputs["certPem"]


@pytest.mark.parametrize("stack", STACKS)
def test_lb_step_carries_the_rendered_configs(stack: str) -> None:
    from model.addressing import plan_addresses
    from model.stack import config_from_stack_file
    from render.lb_config import lb_node_files

    ev = evaluated(stack)
    config = config_from_stack_file(str(ROOT / f"Pulumi.{stack}.yaml"), stack)
    plan = plan_addresses(config)
    for node in plan.load_balancers:
        configure = step(ev, f"{node.hostname}-configure-lb")
        installed = bundle_by_path(configure.inputs["stdin"])
        expected = lb_node_files(config.cluster_name, config.load_balancer.port, plan, node)
        assert installed == {item.path: (item.mode, item.content) for item in expected}
        # The script carries the files' digests, so new configs change the step and re-run it.
        script = script_of(configure)
        for item in expected:
            assert hashlib.sha256(item.content.encode()).hexdigest() in script


@pytest.mark.parametrize("stack", STACKS)
def test_preview_evaluates_with_unknown_outputs(stack: str) -> None:
    preview = evaluate(stack, project_dir=ROOT, preview=True)
    full = evaluated(stack)
    assert sorted(r.urn for r in preview.resources) == sorted(r.urn for r in full.resources)
    assert not preview.outputs["kubeconfig"].known
    assert preview.outputs["kubeconfig"].secret
    assert preview.outputs["apiEndpoint"].value == full.outputs["apiEndpoint"].value
    init = next(r for r in preview.by_type(COMMAND) if r.name.endswith("kubeadm-init"))
    assert init.inputs["stdin"] is UNKNOWN and "stdin" in init.secret_inputs


@pytest.mark.parametrize("stack", STACKS)
def test_a_second_evaluation_is_byte_identical(stack: str) -> None:
    first, second = evaluated(stack), evaluate(stack, project_dir=ROOT)

    # Registration order depends on when outputs resolve; what must not change is each resource's inputs.
    def snapshot(ev: Evaluation) -> dict[str, str]:
        return {
            r.urn: json.dumps([r.inputs, sorted(r.dependencies), sorted(r.secret_inputs)], sort_keys=True, default=str)
            for r in ev.resources
        }

    assert snapshot(first) == snapshot(second)


def test_bad_config_fails_before_any_resource_with_every_problem() -> None:
    config = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    config["kubeadm-ha:controlPlane"] = {"replicas": 2}
    config["kubeadm-ha:loadBalancer"] = {"replicas": 1, "vip": "10.99.0.10"}
    config["kubeadm-ha:kubernetes"] = {"version": "1.30.1"}
    with pytest.raises(ConfigError) as caught:
        evaluate("dev", project_dir=ROOT, config=config)
    paths = {problem.path for problem in caught.value.problems}
    assert {"controlPlane.replicas", "kubernetes.version"} <= paths


def test_smallest_cluster_and_no_cni() -> None:
    config = {
        "kubeadm-ha:network": {"cidr": "10.20.0.0/24"},
        "kubeadm-ha:loadBalancer": {"replicas": 1},
        "kubeadm-ha:controlPlane": {"replicas": 1},
        "kubeadm-ha:workers": {"replicas": 0},
        "kubeadm-ha:kubernetes": {"cni": "none"},
    }
    ev = evaluate("tiny", project_dir=ROOT, config=config)
    names = [r.name for r in commands(ev)]
    assert "tiny-cp-1-kubeadm-init" in names
    assert not any("kubeadm-join" in name or "cni" in name for name in names)
    # Its own token and membership steps exist, on itself and without deletes (it never drains itself), so
    # that scaling to three and back only moves them.
    assert not commands(ev)[names.index("tiny-cp-1-membership")].inputs.get("delete")
    assert ev.outputs["apiEndpoint"].value == "https://10.20.0.10:6443"


def test_upgrade_rules_are_judged_against_the_last_deployment() -> None:
    # The stack files run the default, 1.37.x.
    running = {"kubernetesVersion": "1.36.3", "etcdTopology": "stacked"}
    evaluate("dev", project_dir=ROOT, previous_outputs=running)  # 1.36 -> 1.37: one minor, allowed
    with pytest.raises(ConfigError) as skipped:
        evaluate("dev", project_dir=ROOT, previous_outputs={**running, "kubernetesVersion": "1.35.4"})
    assert "skips a minor version" in str(skipped.value) and "1.36.x first" in str(skipped.value)
    with pytest.raises(ConfigError) as downgraded:
        evaluate("dev", project_dir=ROOT, previous_outputs={**running, "kubernetesVersion": "1.37.9"})
    assert "kubernetes.version" in str(downgraded.value) and "downgrade" in str(downgraded.value)


def test_etcd_topology_cannot_change_on_a_running_cluster() -> None:
    with pytest.raises(ConfigError) as caught:
        evaluate("dev", project_dir=ROOT, previous_outputs={"kubernetesVersion": "1.37.2", "etcdTopology": "external"})
    assert "etcd.topology" in str(caught.value)
    assert evaluated("dev").outputs["etcdTopology"].value == "stacked"
