"""The external etcd topology's pure pieces: config rules, membership plan, flags, manifest, and scripts.

The scripts are *run* with bash against a stub `etcdctl` (and `pgrep`) first on PATH, with their
absolute paths moved into the test's temp dir, to prove the guards, the member add/remove logic and
the bounded waits. tests/integration/test_etcd_live.py proves the flags against a real etcd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.etcd import plan_membership
from model.addressing import plan_addresses
from model.config import ClusterConfig
from model.previous import PreviousDeployment
from model.rules import ConfigError
from model.stack import parse_config
from render import etcd_scripts as etcd_module
from render.etcd import (
    MANIFEST_PATH,
    STOPPED_MANIFEST_PATH,
    EtcdClusterSpec,
    EtcdMember,
    EtcdPaths,
    etcd_member_flags,
    etcd_static_pod,
    render_manifest,
)
from render.etcd_scripts import (
    MemberPems,
    cluster_health_script,
    member_delete_script,
    member_files,
    member_script,
)
from render.hardening import etcd_args
from render.node_prep import (
    ETCD_KUBELET_CONFIG_FILE,
    ETCD_KUBELET_DROP_IN,
    STATIC_POD_DIR,
    etcd_node_preparation,
    standalone_kubelet_configuration,
)
from render.scripts import encode_bundle

# Every flag etcd_member_flags may emit; each exists in etcd 3.4, 3.5 and 3.6 alike.
PORTABLE_FLAGS = {
    "heartbeat-interval",
    "election-timeout",
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "client-cert-auth",
    "trusted-ca-file",
    "cert-file",
    "key-file",
    "peer-client-cert-auth",
    "peer-trusted-ca-file",
    "peer-cert-file",
    "peer-key-file",
    "snapshot-count",
    "listen-metrics-urls",
    "quota-backend-bytes",
    "auto-compaction-mode",
    "auto-compaction-retention",
}


def config(**etcd: Any) -> ClusterConfig:
    return parse_config(
        {
            "network": {"cidr": "10.17.5.0/24"},
            "etcd": {"topology": "external", **etcd},
            "controlPlane": {"replicas": 3},
        },
        stack="t",
    )


def spec(replicas: int = 3, **previous: Any) -> EtcdClusterSpec:
    parsed = config(replicas=replicas)
    return plan_membership(parsed, plan_addresses(parsed), PreviousDeployment(previous))


def problems(raw_etcd: dict[str, Any], **top: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"network": {"cidr": "10.17.5.0/24"}, "etcd": raw_etcd, **top}, stack="t")
    return {problem.path: problem.rule for problem in caught.value.problems}


# ----------------------------------------------------------------------------- config and plan


def test_external_defaults_and_addresses() -> None:
    parsed = config()
    assert (parsed.etcd.replicas, parsed.etcd.cpus, parsed.etcd.memory_mib, parsed.etcd.disk_gib) == (3, 2, 2048, 20)
    members = plan_addresses(parsed).etcd_members
    assert [(m.hostname, str(m.address)) for m in members] == [
        ("t-etcd-1", "10.17.5.21"),
        ("t-etcd-2", "10.17.5.22"),
        ("t-etcd-3", "10.17.5.23"),
    ]
    stacked = parse_config({"network": {"cidr": "10.17.5.0/24"}}, stack="t")
    assert not plan_addresses(stacked).etcd_members


@pytest.mark.parametrize("replicas", [2, 4, 6, 8])
def test_even_replicas_are_refused_with_the_reason(replicas: int) -> None:
    rule = problems({"topology": "external", "replicas": replicas})["etcd.replicas"]
    assert f"{replicas} is even" in rule and "3, 5 or 7" in rule


@pytest.mark.parametrize("replicas", [1, 9, -1])
def test_replicas_outside_three_to_seven_are_refused(replicas: int) -> None:
    assert "3..7" in problems({"topology": "external", "replicas": replicas})["etcd.replicas"]


def test_sizing_minimums() -> None:
    found = problems({"topology": "external", "cpus": 0, "memoryMiB": 512, "diskGiB": 5})
    assert {"etcd.cpus", "etcd.memoryMiB", "etcd.diskGiB"} <= set(found)


def test_sizing_keys_with_stacked_etcd_are_refused_as_ignored() -> None:
    found = problems({"topology": "stacked", "replicas": 5, "memoryMiB": 4096})
    assert set(found) == {"etcd.replicas", "etcd.memoryMiB"}
    assert "only used with etcd.topology external" in found["etcd.replicas"]


def test_kubernetes_minor_the_table_does_not_know_is_refused() -> None:
    found = problems({"topology": "external"}, kubernetes={"version": "1.38.0"})
    assert "1.38" in found["kubernetes.version"] and "1.34, 1.35, 1.36, 1.37" in found["kubernetes.version"]


@pytest.mark.parametrize(("version", "tag"), [("1.35.1", "3.6.6-0"), ("1.36.3", "3.6.8-0"), ("1.37.2", "3.7.0-0")])
def test_a_new_cluster_starts_on_the_etcd_kubeadm_pins_for_its_minor(version: str, tag: str) -> None:
    parsed = parse_config(
        {"network": {"cidr": "10.17.5.0/24"}, "etcd": {"topology": "external"}, "kubernetes": {"version": version}},
        stack="t",
    )
    assert plan_membership(parsed, plan_addresses(parsed), PreviousDeployment()).image == f"registry.k8s.io/etcd:{tag}"


def test_a_kubernetes_upgrade_keeps_the_running_etcd_unless_etcd_version_says_otherwise() -> None:
    running = PreviousDeployment({"etcdTopology": "external", "kubernetesVersion": "1.36.3", "etcdImageTag": "3.6.8-0"})
    raw = {"network": {"cidr": "10.17.5.0/24"}, "etcd": {"topology": "external"}, "kubernetes": {"version": "1.37.2"}}
    upgraded = parse_config(raw, stack="t", previous=running)
    assert plan_membership(upgraded, plan_addresses(upgraded), running).image == "registry.k8s.io/etcd:3.6.8-0"
    rolled = parse_config({**raw, "etcd": {"topology": "external", "version": "3.7.0-0"}}, stack="t", previous=running)
    assert plan_membership(rolled, plan_addresses(rolled), running).image == "registry.k8s.io/etcd:3.7.0-0"


def test_an_etcd_older_than_kubeadm_accepts_is_refused() -> None:
    found = problems({"topology": "external", "version": "3.5.21-0"})
    assert "3.5.24-0" in found["etcd.version"] and "MinExternalEtcdVersion" in found["etcd.version"]


def test_previous_members_of_another_cluster_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"network": {"cidr": "10.17.5.0/24"}, "etcd": {"topology": "external"}},
            stack="t",
            previous=PreviousDeployment({"etcdTopology": "external", "etcdInitialMembers": ["old-etcd-1"]}),
        )
    assert "clusterName" in {problem.path for problem in caught.value.problems}


def test_new_stack_bootstraps_every_planned_member() -> None:
    plan = spec(3)
    assert plan.initial_members == ("t-etcd-1", "t-etcd-2", "t-etcd-3")
    for member in plan.members:
        start = plan.starts[member.name]
        assert start.state == "new" and start.initial_cluster == plan.members
    assert plan.client_urls == ("https://10.17.5.21:2379", "https://10.17.5.22:2379", "https://10.17.5.23:2379")


def test_members_beyond_the_initial_ones_are_added_onto_the_lower_ones() -> None:
    plan = spec(7, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    assert plan.initial_members == ("t-etcd-1", "t-etcd-2", "t-etcd-3")
    for member in plan.members:
        start = plan.starts[member.name]
        if member.index <= 3:
            assert start.state == "new" and [m.index for m in start.initial_cluster] == [1, 2, 3]
        else:
            assert start.state == "existing"
            assert [m.index for m in start.initial_cluster] == list(range(1, member.index + 1))


def test_removed_initial_members_keep_the_survivors_flags_and_come_back_as_additions() -> None:
    five = [f"t-etcd-{i}" for i in range(1, 6)]
    down = spec(3, etcdInitialMembers=five, etcdMembers=five)
    for member in down.members:
        start = down.starts[member.name]
        assert start.state == "new" and [str(m.address) for m in start.initial_cluster] == [
            f"10.17.5.{20 + i}" for i in range(1, 6)
        ]
    up = spec(5, etcdInitialMembers=five, etcdMembers=five[:3])
    assert [up.starts[f"t-etcd-{i}"].state for i in range(1, 6)] == ["new", "new", "new", "existing", "existing"]
    assert up.initial_members == tuple(five)


# ----------------------------------------------------------------------------- flags and manifest


def test_member_flags() -> None:
    plan = spec(3)
    member = plan.member("t-etcd-2")
    flags = etcd_member_flags(member, plan)
    assert flags == (
        "--name=t-etcd-2",
        "--data-dir=/var/lib/etcd",
        "--listen-client-urls=https://127.0.0.1:2379,https://10.17.5.22:2379",
        "--advertise-client-urls=https://10.17.5.22:2379",
        "--listen-peer-urls=https://10.17.5.22:2380",
        "--initial-advertise-peer-urls=https://10.17.5.22:2380",
        "--initial-cluster=" + ",".join(f"t-etcd-{i}=https://10.17.5.2{i}:2380" for i in (1, 2, 3)),
        "--initial-cluster-state=new",
        "--initial-cluster-token=t-etcd",
        "--client-cert-auth=true",
        "--trusted-ca-file=/etc/kubernetes/pki/etcd/ca.crt",
        "--cert-file=/etc/kubernetes/pki/etcd/server.crt",
        "--key-file=/etc/kubernetes/pki/etcd/server.key",
        "--peer-client-cert-auth=true",
        "--peer-trusted-ca-file=/etc/kubernetes/pki/etcd/ca.crt",
        "--peer-cert-file=/etc/kubernetes/pki/etcd/peer.crt",
        "--peer-key-file=/etc/kubernetes/pki/etcd/peer.key",
        "--snapshot-count=10000",
        "--listen-metrics-urls=http://127.0.0.1:2381",
        "--quota-backend-bytes=4294967296",
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=0",
    )
    names = [word.removeprefix("--").split("=", 1)[0] for word in flags]
    assert set(names) <= PORTABLE_FLAGS and len(names) == len(set(names))


def test_members_get_the_configured_quota_and_compaction_as_stacked_etcd_does() -> None:
    """etcd.maintenance reaches an external member's flags exactly as etcd_args gives them to kubeadm's
    etcd.local.extraArgs for a stacked member."""
    maintenance = {"quotaBackendBytes": 2**31, "autoCompactionMode": "revision", "autoCompactionRetention": "1000"}
    parsed = config(maintenance=maintenance)
    plan = plan_membership(parsed, plan_addresses(parsed), PreviousDeployment({}))
    assert plan.maintenance == parsed.etcd.maintenance
    expected = (
        "--quota-backend-bytes=2147483648",
        "--auto-compaction-mode=revision",
        "--auto-compaction-retention=1000",
    )
    assert tuple(f"--{name}={value}" for name, value in etcd_args(parsed.etcd.maintenance, None)) == expected
    for member in plan.members:
        flags = etcd_member_flags(member, plan)
        assert flags[-3:] == expected
        assert render_manifest(member, plan).count("--quota-backend-bytes=") == 1


def test_members_get_the_raft_timing_only_when_the_stack_sets_it() -> None:
    """etcd.timing reaches an external member's flags as it reaches a stacked member's extraArgs; unset, no flag."""
    assert not any(flag.startswith(("--heartbeat-interval", "--election-timeout")) for flag in member_flags(config()))
    timed = config(timing={"heartbeatIntervalMs": 500, "electionTimeoutMs": 5000})
    expected = ("--heartbeat-interval=500", "--election-timeout=5000")
    assert member_flags(timed)[-2:] == expected
    assert tuple(f"--{name}={value}" for name, value in etcd_args(timed.etcd.maintenance, timed.etcd.timing))[-2:] == (
        expected
    )


def member_flags(parsed: ClusterConfig) -> tuple[str, ...]:
    plan = plan_membership(parsed, plan_addresses(parsed), PreviousDeployment({}))
    flags = {member.name: etcd_member_flags(member, plan) for member in plan.members}
    assert len(flags) == 3
    return flags["t-etcd-2"]


def test_flags_follow_remapped_paths() -> None:
    paths = EtcdPaths(
        data_dir="/tmp/x/data",
        trusted_ca="/tmp/x/pki/ca.crt",
        server_cert="/tmp/x/pki/s.crt",
        server_key="/tmp/x/pki/s.key",
        peer_cert="/tmp/x/pki/p.crt",
        peer_key="/tmp/x/pki/p.key",
    )
    plan = dataclasses.replace(spec(3), paths=paths)
    flags = etcd_member_flags(plan.member("t-etcd-1"), plan)
    assert "--data-dir=/tmp/x/data" in flags and "--peer-key-file=/tmp/x/pki/p.key" in flags
    assert not any("/etc/kubernetes" in word for word in flags)


def test_static_pod_manifest() -> None:
    plan = spec(3)
    member = plan.member("t-etcd-1")
    pod = yaml.safe_load(render_manifest(member, plan))
    assert pod == etcd_static_pod(member, plan)
    assert (pod["apiVersion"], pod["kind"], pod["metadata"]["namespace"]) == ("v1", "Pod", "kube-system")
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["etcd", *etcd_member_flags(member, plan)]
    assert container["image"] == "registry.k8s.io/etcd:3.7.0-0"
    assert container["livenessProbe"]["httpGet"] == {
        "host": "127.0.0.1",
        "path": "/livez",
        "port": 2381,
        "scheme": "HTTP",
    }
    mounts = {mount["mountPath"]: mount.get("readOnly", False) for mount in container["volumeMounts"]}
    assert mounts == {"/var/lib/etcd": False, "/etc/kubernetes/pki/etcd": True}
    assert {volume["hostPath"]["path"] for volume in pod["spec"]["volumes"]} == set(mounts)
    assert pod["spec"]["hostNetwork"] is True
    assert render_manifest(member, plan) == render_manifest(member, plan)


def test_static_pod_refuses_certificates_in_several_directories() -> None:
    plan = dataclasses.replace(spec(3), paths=EtcdPaths(peer_key="/elsewhere/peer.key"))
    with pytest.raises(ValueError, match="one directory"):
        etcd_static_pod(plan.member("t-etcd-1"), plan)


def test_etcd_node_preparation() -> None:
    parsed = config()
    text = etcd_node_preparation("t-etcd-1", parsed.kubernetes).render()
    assert "kubelet=1.37.2-1.1" in text and "kubeadm=" not in text and "kubectl=" not in text
    assert " etcd-client" in text and "apt-mark hold kubelet" in text
    assert f"ExecStart=/usr/bin/kubelet --config={ETCD_KUBELET_CONFIG_FILE}" in text
    assert ETCD_KUBELET_DROP_IN in text and f"install -d -m 0755 {STATIC_POD_DIR}" in text
    kubelet = standalone_kubelet_configuration()
    assert kubelet["staticPodPath"] == STATIC_POD_DIR and kubelet["address"] == "127.0.0.1"
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert yaml.safe_dump(kubelet, sort_keys=False) in text.replace("'\"'\"'", "'")
    assert text.index("if [ -f /var/lib/kubeadm-ha/prepared ]") < text.index("apt-get")


# ----------------------------------------------------------------------------- scripts, run with stubs

STUB_ETCDCTL = r"""#!/bin/bash
# Stand-in for etcdctl: logs each call; answers from files in $STUB_DIR.
printf '%s\n' "$*" >>"$STUB_DIR/calls"
endpoints="" words=()
for arg in "$@"; do
  case "$arg" in
    --endpoints=*) endpoints="${arg#--endpoints=}" ;;
    --*) ;;
    *) words+=("$arg") ;;
  esac
done
unhealthy=",$(cat "$STUB_DIR/unhealthy" 2>/dev/null),"
case "${words[0]:-} ${words[1]:-}" in
  "endpoint health")
    IFS=, read -ra urls <<<"$endpoints"
    for url in "${urls[@]}"; do
      case "$unhealthy" in *",$url,"*) echo "$url is unhealthy" >&2; exit 1 ;; esac
    done
    exit 0 ;;
  "member list")
    [ -f "$STUB_DIR/list-fails" ] && exit 1
    cat "$STUB_DIR/members"; exit 0 ;;
  "member add")
    failures="$(cat "$STUB_DIR/add-fails" 2>/dev/null || echo 0)"
    if [ "$failures" -gt 0 ]; then
      echo $((failures - 1)) >"$STUB_DIR/add-fails"
      echo "etcdserver: unhealthy cluster" >&2
      exit 1
    fi
    exit 0 ;;
  "member remove") [ -f "$STUB_DIR/remove-fails" ] && { echo "etcdserver: unhealthy cluster" >&2; exit 1; }; exit 0 ;;
esac
exit 2
"""
STUB_PGREP = "#!/bin/bash\nexit 1\n"  # no etcd process: stops are immediate


class Node:
    """A fake node: a temp dir holding the script's absolute paths, and stubs first on PATH."""

    ROOTS = ("/etc/kubernetes", "/var/lib/etcd", "/var/log/kubeadm-ha", "/var/lib/kubeadm-ha")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stubs = root / "stubs"
        self.stubs.mkdir()
        for name, text in (("etcdctl", STUB_ETCDCTL), ("pgrep", STUB_PGREP)):
            (self.stubs / name).write_text(text)
            (self.stubs / name).chmod(0o755)
        (self.stubs / "calls").touch()

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def localise(self, text: str) -> str:
        for prefix in self.ROOTS:
            text = text.replace(prefix, str(self.root) + prefix)
        return text

    def run(self, text: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.stubs}:{os.environ['PATH']}", "STUB_DIR": str(self.stubs)}
        return subprocess.run(
            ["bash", "-c", self.localise(text)],
            input=self.localise(stdin),
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    def calls(self) -> list[list[str]]:
        return [line.split() for line in (self.stubs / "calls").read_text().splitlines()]

    def etcdctl(self, subcommand: str) -> list[list[str]]:
        return [call for call in self.calls() if subcommand in " ".join(call)]

    def set(self, name: str, content: str | None) -> None:
        path = self.stubs / name
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounds short enough for a test (the values are rendered into the scripts)."""
    monkeypatch.setattr(etcd_module, "POLL_SECONDS", 0)
    monkeypatch.setattr(etcd_module, "CLUSTER_READY_TIMEOUT_SECONDS", 1)
    # Long enough for a few retries of the stubbed etcdctl on a loaded 2-core machine (1 s was not).
    monkeypatch.setattr(etcd_module, "MEMBER_READY_TIMEOUT_SECONDS", 4)


PEMS = MemberPems("CA\n", "SERVER\n", "server-key\n", "PEER\n", "peer-key\n", "HEALTH\n", "health-key\n")


def digests(plan: EtcdClusterSpec) -> dict[str, str]:
    public = {
        plan.paths.trusted_ca: PEMS.ca_cert,
        plan.paths.server_cert: PEMS.server_cert,
        plan.paths.peer_cert: PEMS.peer_cert,
        plan.paths.healthcheck_cert: PEMS.healthcheck_cert,
    }
    return {path: hashlib.sha256(text.encode()).hexdigest() for path, text in public.items()}


def member_run(node: Node, plan: EtcdClusterSpec, name: str) -> subprocess.CompletedProcess[str]:
    member = plan.member(name)
    return node.run(
        member_script(member, plan, digests(plan)).render(), encode_bundle(member_files(member, plan, PEMS))
    )


def member_listing(plan: EtcdClusterSpec, names: list[str], unstarted: str = "") -> str:
    lines = [
        f"{index:016x}, started, {m.name}, {m.peer_url}, {m.client_url}, false"
        for index, m in enumerate(plan.members, start=1)
        if m.name in names
    ]
    if unstarted:
        lines.append(f"00000000000000ff, unstarted, , {plan.member(unstarted).peer_url}, , false")
    return "\n".join(lines) + "\n"


def test_bootstrapping_member_installs_and_starts_without_waiting_then_is_a_no_op(node: Node, fast: None) -> None:
    plan = spec(3)
    first = member_run(node, plan, "t-etcd-1")
    assert first.returncode == 0, first.stderr
    assert node.calls() == []  # no etcdctl: its peers may not have started yet
    manifest = node.path(MANIFEST_PATH)
    assert manifest.read_text() == render_manifest(plan.member("t-etcd-1"), plan)
    assert oct(manifest.stat().st_mode & 0o777) == "0o600"
    assert node.path(plan.paths.server_key).read_text() == "server-key\n"
    assert oct(node.path(plan.paths.server_key).stat().st_mode & 0o777) == "0o600"
    assert oct(node.path(plan.paths.data_dir).stat().st_mode & 0o777) == "0o700"
    assert not any(path.name.startswith(".") for path in node.path(STATIC_POD_DIR).iterdir())

    second = member_run(node, plan, "t-etcd-1")
    assert second.returncode == 0 and "already done" in second.stdout
    # New certificates (digests) make it run again, without a restart: the manifest is unchanged.
    node.path(plan.paths.server_cert).write_text("OLD\n")
    third = member_run(node, plan, "t-etcd-1")
    assert third.returncode == 0 and "already done" not in third.stdout
    assert node.path(plan.paths.server_cert).read_text() == "SERVER\n"
    assert not node.path(STOPPED_MANIFEST_PATH).exists() and node.calls() == []


def test_changed_manifest_restarts_the_member_and_waits_until_it_is_healthy(node: Node, fast: None) -> None:
    plan = spec(3)
    node.path(MANIFEST_PATH).parent.mkdir(parents=True)
    node.path(MANIFEST_PATH).write_text("an older etcd\n")
    result = member_run(node, plan, "t-etcd-2")
    assert result.returncode == 0, result.stderr
    assert node.path(STOPPED_MANIFEST_PATH).read_text() == "an older etcd\n"
    assert node.etcdctl("endpoint health")[-1][-3:] == ["--endpoints=https://10.17.5.22:2379", "endpoint", "health"]

    node.path(MANIFEST_PATH).write_text("an older etcd\n")
    node.set("unhealthy", "https://10.17.5.22:2379")
    failed = member_run(node, plan, "t-etcd-2")
    assert failed.returncode != 0
    assert "gave up after 4s waiting for etcd member t-etcd-2 to be healthy on t-etcd-2" in failed.stderr


def test_added_member_waits_for_the_others_then_member_adds_then_waits_for_itself(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3"]))
    result = member_run(node, plan, "t-etcd-4")
    assert result.returncode == 0, result.stderr
    existing = "--endpoints=https://10.17.5.21:2379,https://10.17.5.22:2379,https://10.17.5.23:2379"
    health = [call[-3] for call in node.etcdctl("endpoint health")]
    assert health == [
        "--endpoints=https://10.17.5.21:2379",
        "--endpoints=https://10.17.5.22:2379",
        "--endpoints=https://10.17.5.23:2379",
        "--endpoints=https://10.17.5.24:2379",
    ]
    (add,) = node.etcdctl("member add")
    assert add[-5:] == [existing, "member", "add", "t-etcd-4", "--peer-urls=https://10.17.5.24:2380"]
    calls = [" ".join(call) for call in node.calls()]
    assert calls.index(" ".join(add)) < len(calls) - 1  # its own health check comes after the add
    assert "--initial-cluster-state=existing" in node.path(MANIFEST_PATH).read_text()


def test_member_add_is_retried_while_etcd_refuses_it_then_given_up_in_time(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3"]))
    node.set("add-fails", "2")  # etcd's strict reconfig check: "unhealthy cluster" until its leader settles
    result = member_run(node, plan, "t-etcd-4")
    assert result.returncode == 0, result.stderr
    assert len(node.etcdctl("member add")) == 3
    # Each attempt lists the members first, so an add whose answer was lost is never repeated.
    assert len(node.etcdctl("member list")) == 4

    node.path(MANIFEST_PATH).unlink()
    node.set("add-fails", "1000")
    refused = member_run(node, plan, "t-etcd-4")
    assert refused.returncode != 0
    assert "gave up after 4s waiting for the etcd cluster to accept t-etcd-4" in refused.stderr
    assert "etcdserver: unhealthy cluster" in refused.stderr  # the log's tail
    assert not node.path(MANIFEST_PATH).exists()


def test_an_added_member_is_not_added_twice(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    # A run interrupted after `member add`: the member is listed, unstarted.
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3"], unstarted="t-etcd-4"))
    result = member_run(node, plan, "t-etcd-4")
    assert result.returncode == 0, result.stderr
    assert node.etcdctl("member add") == []


def test_an_added_member_with_stale_data_is_refused(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3"]))
    node.path("/var/lib/etcd/member").mkdir(parents=True)
    result = member_run(node, plan, "t-etcd-4")
    assert result.returncode != 0
    assert "data of a removed member" in result.stderr
    assert node.etcdctl("member add") == [] and not node.path(MANIFEST_PATH).exists()


def test_an_unhealthy_cluster_gets_no_new_member(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    node.set("unhealthy", "https://10.17.5.22:2379")
    result = member_run(node, plan, "t-etcd-4")
    assert result.returncode != 0
    assert "etcd member t-etcd-2 to be healthy before adding t-etcd-4" in result.stderr
    assert node.etcdctl("member add") == [] and node.etcdctl("member list") == []


def delete_run(node: Node, plan: EtcdClusterSpec, name: str) -> subprocess.CompletedProcess[str]:
    node.path(MANIFEST_PATH).parent.mkdir(parents=True, exist_ok=True)
    node.path(MANIFEST_PATH).write_text("running\n")
    return node.run(member_delete_script(plan.member(name), plan.paths).render())


def test_delete_removes_the_member_through_the_others_then_stops_it(node: Node, fast: None) -> None:
    plan = spec(5, etcdInitialMembers=["t-etcd-1", "t-etcd-2", "t-etcd-3"])
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3", "t-etcd-4", "t-etcd-5"]))
    result = delete_run(node, plan, "t-etcd-5")
    assert result.returncode == 0, result.stderr
    (listing,) = node.etcdctl("member list")
    assert "--endpoints=https://127.0.0.1:2379" in listing
    (remove,) = node.etcdctl("member remove")
    others = ",".join(f"https://10.17.5.2{i}:2379" for i in range(1, 5))
    assert remove[-4:] == [f"--endpoints={others}", "member", "remove", f"{5:016x}"]
    assert not node.path(MANIFEST_PATH).exists()
    again = node.run(member_delete_script(plan.member("t-etcd-5"), plan.paths).render())
    assert "already done" in again.stdout


def test_delete_of_the_last_member_just_stops_it(node: Node, fast: None) -> None:
    plan = spec(3)
    node.set("members", member_listing(plan, ["t-etcd-1"]))
    result = delete_run(node, plan, "t-etcd-1")
    assert result.returncode == 0, result.stderr
    assert node.etcdctl("member remove") == []
    assert "last etcd member" in result.stdout and not node.path(MANIFEST_PATH).exists()


def test_delete_when_etcd_does_not_answer_just_stops_it(node: Node, fast: None) -> None:
    plan = spec(3)
    node.set("list-fails", "")
    result = delete_run(node, plan, "t-etcd-3")
    assert result.returncode == 0, result.stderr
    assert "does not answer" in result.stderr and not node.path(MANIFEST_PATH).exists()


def test_delete_without_quorum_stops_and_with_quorum_refuses(node: Node, fast: None) -> None:
    plan = spec(3)
    node.set("members", member_listing(plan, ["t-etcd-1", "t-etcd-2", "t-etcd-3"]))
    node.set("remove-fails", "")
    node.set("unhealthy", "https://10.17.5.21:2379,https://10.17.5.22:2379")
    lost = delete_run(node, plan, "t-etcd-3")
    assert lost.returncode == 0, lost.stderr
    assert "no quorum" in lost.stderr and not node.path(MANIFEST_PATH).exists()

    node.set("unhealthy", None)
    refused = delete_run(node, plan, "t-etcd-3")
    assert refused.returncode != 0
    assert "refusing to stop it" in refused.stderr
    assert node.path(MANIFEST_PATH).exists()


def test_health_guard_and_bounded_wait_naming_the_unhealthy_member(node: Node, fast: None) -> None:
    plan = spec(3)
    script = cluster_health_script("t-etcd-1", plan).render()
    healthy = node.run(script)
    assert healthy.returncode == 0 and "already done" in healthy.stdout
    node.set("unhealthy", "https://10.17.5.23:2379")
    sick = node.run(script)
    assert sick.returncode != 0
    assert "unhealthy: t-etcd-3 (https://10.17.5.23:2379)" in sick.stderr
    assert "t-etcd-1" not in sick.stderr.split("unhealthy:")[1]


def test_hostile_names_are_refused_and_hostile_paths_stay_quoted(node: Node, fast: None) -> None:
    plan = spec(3)
    hostile = EtcdMember("t-etcd-1'; touch /tmp/pwned; '", 1, ipaddress.IPv4Address("10.17.5.21"))
    with pytest.raises(ValueError, match="must be letters"):
        member_delete_script(hostile, plan.paths)
    canary = node.root / "pwned"
    odd = EtcdPaths(healthcheck_cert=f"/etc/kubernetes/pki/etcd/x'; touch {canary}; '$(touch {canary}).crt")
    text = cluster_health_script("t-etcd-1", dataclasses.replace(plan, paths=odd)).render()
    assert shlex.quote(f"--cert={odd.healthcheck_cert}") in text
    result = node.run(text)
    assert result.returncode == 0, result.stderr
    assert not canary.exists()
    # etcdctl got the odd path as one argument.
    lines = (node.stubs / "calls").read_text().splitlines()
    assert lines and all(f" --cert={node.localise(odd.healthcheck_cert)} --key=" in line for line in lines)
