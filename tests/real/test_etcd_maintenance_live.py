"""The etcd maintenance timer's script (render/etcd_maintenance.py) against a real three-member etcd, for real.

Real: three etcd 3.7 members started with the program's own flags for prod's members (`etcd_member_flags`, the
quota and compaction flags of `etcd.maintenance` included; TLS for clients and peers), each in a network namespace
at its planned address on one bridge, each with its own containerd 2.2, `ctr`, the runc shim and Debian's runc, as
on the etcd VMs; the script, rendered by the program and run by bash as root in the member's namespace, running
etcdctl from the member's image through `ctr run`; `etcdctl lock`, `defrag`, `alarm list` and etcd's NOSPACE.
Stand-ins, as in tests/real/test_ctr_etcd_tools.py: the image (built locally around the real etcdctl), the
certificates (the test's own CA, server and peer pairs for 127.0.0.1 and each address, the healthcheck client),
the paths (moved under the test's directory).

Proven:
- two members' scripts started together never defragment at once: both pass their checks and wait in the lock
  (the test holds it first, so both are ready at the moment it is let go), and etcd's own log lines ("starting
  defragment", "finished defragment") on the two members give intervals that do not overlap; the same two members
  told to defragment at once without the lock do overlap (so the check can fail); every member's database shrinks
  after many keys are deleted and compacted; a second run is not due and only looks at the alarms;
- with a member down, a due run on another one skips (exit 0), naming the unhealthy member, and defragments nothing;
- a real NOSPACE (one member restarted with an 8 MiB --quota-backend-bytes, then filled) fails the run with exit
  ALARM_EXIT and a crit line on every member, the status file names NOSPACE, and nothing is defragmented; the
  README's operator commands (etcdctl from the member's image through ctr: alarm list, compact to the current
  revision, defragment each member in turn, disarm) clear it, and the next run defragments again.

Runs as root; needs what tests/real/test_ctr_etcd_tools.py needs. Under CI=true missing ones fail.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from components.etcd import plan_membership
from model.addressing import plan_addresses
from model.previous import NEW_STACK
from model.stack import config_from_stack_file
from render.etcd import EtcdClusterSpec, EtcdMember, EtcdPaths, etcd_member_flags, render_manifest
from render.etcd_maintenance import ALARM_EXIT, LOCK_NAME, STATUS_PATH, maintenance_script
from render.scripts import Script
from tests.certificates import issue
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, Process, cleanup_stale, poll_until, scratch_dir
from tests.real.binaries import binary
from tests.real.test_ctr_etcd_tools import (
    REPO,
    START_BOUND,
    CtrNode,
    HostState,
    Ran,
    _key,
    _pem_key,
    build_etcd_image,
    start_containerd,
    stop_containerd,
)

pytestmark = pytest.mark.real

VALUES = 16
# Kept through the first defragmentations, so each copies some MiB and takes a while: two at once would overlap.
LIVE_VALUES = 8
LIVE_PREFIX = "kubeadm-ha-live/"
VALUE_BYTES = 1 << 20
TINY_QUOTA = 8 << 20
TEST_PREFIX = "kubeadm-ha-test/"
# The README's "etcd maintenance" commands, as an operator runs them on a member as root (etcdctl from the member's
# own image through ctr, as the timer does); run here as they are, their paths moved as the scripts' are.
OPERATOR_ETCDCTL = r"""image=$(awk '$1 == "image:" {print $2; exit}' /etc/kubernetes/manifests/etcd.yaml)
pki=/etc/kubernetes/pki/etcd
etcdctl() {
  ctr -n k8s.io run --rm --net-host --mount "type=bind,src=$pki,dst=$pki,options=rbind:ro" \
    "$image" "etcdctl-$$-$RANDOM" etcdctl --endpoints=https://127.0.0.1:2379 --cacert="$pki/ca.crt" \
    --cert="$pki/healthcheck-client.crt" --key="$pki/healthcheck-client.key" --command-timeout=300s "$@"
}"""
OPERATOR_LOOK = "etcdctl alarm list\netcdctl endpoint status --cluster -w table"
OPERATOR_COMPACT = """rev=$(etcdctl endpoint status -w json | grep -o '"revision":[0-9]*' | cut -d: -f2)
etcdctl compact "$rev" --physical"""
OPERATOR_DEFRAG = "etcdctl defrag"
OPERATOR_DISARM = "etcdctl alarm disarm\netcdctl alarm list"


def report(message: str) -> None:
    print(f"[etcd-maintenance] {message}")


@dataclass
class Member:
    node: CtrNode
    member: EtcdMember
    spec: EtcdClusterSpec
    process: Process
    root: Path

    def flags(self) -> list[str]:
        return list(etcd_member_flags(self.member, self.spec))

    @property
    def status_path(self) -> Path:
        return self.root / "state" / os.path.basename(STATUS_PATH)

    def status(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.status_path.read_text().splitlines())

    def restart(self, cluster: Cluster, *flags: str) -> None:
        """Stop this member's etcd and start it again on its data, with `flags` (default: the program's)."""
        self.process.stop(signal.SIGTERM, timeout=15)
        argv = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", cluster.etcd, *(flags or self.flags())]
        self.process = cluster.lab.spawn(self.node.namespace, argv, name=f"{self.process.name}-again")
        wait_healthy(self)

    def db_size(self) -> int:
        found = self.node.etcd("endpoint", "status", "-w", "json")
        assert found.returncode == 0, found.stderr
        return int(json.loads(found.stdout)[0]["Status"]["dbSize"])

    def run(self, script: Script) -> Ran:
        return self.node.run(script, self.root)

    def operator(self, *commands: str) -> Ran:
        """The README's commands, run by bash as root on this member."""
        body = "\n".join((OPERATOR_ETCDCTL, *commands)).splitlines()
        return self.run(
            Script(step="operator", host=self.node.host, done_when="false", body=tuple(body), on_node=False)
        )

    def defrag_intervals(self) -> list[tuple[datetime.datetime, datetime.datetime]]:
        """(start, end) of every defragmentation in etcd's own log."""
        starts, ends = [], []
        for line in self.process.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                moment = datetime.datetime.fromisoformat(entry["ts"])
                {"starting defragment": starts, "finished defragment": ends}.get(entry["msg"], []).append(moment)
        assert len(starts) == len(ends), (starts, ends)
        return list(zip(starts, ends, strict=True))


def write_member_pki(
    directory: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], client: tuple[bytes, bytes], address: str
) -> EtcdPaths:
    """The member's certificate directory (kubeadm's file names) and its paths, data under `directory`."""
    directory.mkdir(parents=True, mode=0o700)
    pki = directory / "pki"
    pki.mkdir(mode=0o700)
    files = {"ca.crt": ca[0].public_bytes(serialization.Encoding.PEM)}
    files["healthcheck-client.crt"], files["healthcheck-client.key"] = client
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for kind in ("server", "peer"):
        key = _key()
        cert = issue(f"etcd-{kind}", key, ca, usages=usages, ips=("127.0.0.1", address))
        files[f"{kind}.crt"], files[f"{kind}.key"] = cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
    for name, content in files.items():
        (pki / name).write_bytes(content)
        (pki / name).chmod(0o600)
    default = EtcdPaths()
    return EtcdPaths(
        data_dir=str(directory / "data"),
        **{
            field.name: str(pki / Path(getattr(default, field.name)).name)
            for field in dataclasses.fields(EtcdPaths)
            if field.name != "data_dir"
        },
    )


def wait_healthy(member: Member) -> None:
    def healthy() -> bool:
        assert member.process.alive(), f"etcd on {member.node.host} exited:\n{member.process.log()[-2000:]}"
        return member.node.etcd("endpoint", "health").returncode == 0

    poll_until(healthy, timeout=START_BOUND, interval=0.3, message=f"etcd on {member.node.host} to be healthy")


@dataclass
class Cluster:
    lab: Lab
    members: list[Member]
    etcd: str


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    require_root()
    programs = require_programs("ip", "nsenter", "runc", "umount", "bash", "timeout", "awk")
    names = ("containerd", "ctr", "containerd-shim-runc-v2", "etcd", "etcdctl")
    binaries = {name: binary(name) for name in names}
    cleanup_stale()
    config = config_from_stack_file(str(REPO / "Pulumi.prod.yaml"), "prod")
    plan = plan_addresses(config)
    spec = plan_membership(config, plan, NEW_STACK)
    work = scratch_dir("maint")
    host_state = HostState.before(work)
    lab = Lab("maint", log_dir=work / "logs")
    members: list[Member] = []
    failed = False
    failures = request.session.testsfailed
    started = time.monotonic()
    try:
        bridge = lab.bridge()
        ca_key = _key()
        ca = issue("etcd-ca", ca_key)
        client_key = _key()
        client = issue(
            "kube-etcd-healthcheck-client", client_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        client_pair = (client.public_bytes(serialization.Encoding.PEM), _pem_key(client_key))
        archive = build_etcd_image(work, spec.image, {"etcdctl": binaries["etcdctl"]})
        for member in spec.members:
            namespace = lab.namespace(member.name.removeprefix("prod-"))
            lab.attach(namespace, bridge, ipaddress.IPv4Interface(f"{member.address}/{plan.network.prefixlen}"))
            root = work / member.name
            paths = write_member_pki(root, (ca, ca_key), client_pair, str(member.address))
            local = dataclasses.replace(spec, paths=paths)
            pki = {"ca": Path(paths.trusted_ca), "client-cert": Path(paths.healthcheck_cert),
                   "client-key": Path(paths.healthcheck_key)}  # fmt: skip
            node = CtrNode(namespace, root, root / "containerd.sock", binaries["ctr"], binaries["etcdctl"],
                           member.name, render_manifest(member, spec), spec.image, pki)  # fmt: skip
            argv = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", binaries["etcd"]]
            process = lab.spawn(namespace, [*argv, *etcd_member_flags(member, local)], name=f"etcd-{member.index}")
            members.append(Member(node, member, local, process, root / "node"))
        for item in members:
            wait_healthy(item)
            containerd = f"containerd-{item.member.index}"
            item.node.socket = start_containerd(lab, item.node.namespace, item.node.work, binaries, programs["nsenter"],
                                                name=containerd)  # fmt: skip
            imported = item.node.ctr_run("images", "import", str(archive))
            assert imported.returncode == 0, imported.stderr
        archive.unlink()
        report(f"3 members with the program's flags and 3 containerds up in {time.monotonic() - started:.1f}s")
        yield Cluster(lab, members, binaries["etcd"])
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request) or request.session.testsfailed > failures:
            print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs(tail=30)}")
        for item in members:
            if item.node.socket.exists():
                item.node.remove_containers()
        stop_containerd(lab)
        lab.close()
        host_state.restore(programs["runc"])
        report(f"module took {time.monotonic() - started:.1f}s, torn down")


def put_values(member: Member, count: int, *, prefix: str = TEST_PREFIX, until_refused: bool = False) -> int:
    """`count` values of VALUE_BYTES under `prefix` through `member` (etcdctl reads a value from stdin); with
    `until_refused`, stop at the first put etcd refuses for space and return how many went in."""
    value = os.urandom(VALUE_BYTES // 2).hex().encode()
    node = member.node
    flags = [f"--cacert={node.pki['ca']}", f"--cert={node.pki['client-cert']}", f"--key={node.pki['client-key']}"]
    for index in range(count):
        argv = [node.etcdctl, "--endpoints=https://127.0.0.1:2379", *flags, "--command-timeout=30s", "put",
                f"{prefix}{index:03d}"]  # fmt: skip
        put = subprocess.run(node.namespace.exec_argv(argv), input=value, capture_output=True, timeout=60, check=False)
        if until_refused and b"database space exceeded" in put.stderr:
            return index
        assert put.returncode == 0, put.stderr
    assert not until_refused, f"{count} values went in without NOSPACE"
    return count


def delete_and_compact(member: Member, prefix: str) -> None:
    """Delete the keys under `prefix`, then compact to the revision after that: nothing of them is kept."""
    deleted = member.node.etcd("del", "--prefix", prefix)
    assert deleted.returncode == 0, deleted.stderr
    compacted = member.node.etcd("compact", str(revision(member)), "--physical")
    assert compacted.returncode == 0, compacted.stderr


def revision(member: Member) -> int:
    found = member.node.etcd("endpoint", "status", "-w", "json")
    return int(json.loads(found.stdout)[0]["Status"]["header"]["revision"])


def lock_keys(member: Member) -> list[str]:
    found = member.node.etcd("get", "--prefix", f"{LOCK_NAME}/", "--keys-only")
    assert found.returncode == 0, found.stderr
    return [line for line in found.stdout.splitlines() if line.strip()]


def hold_lock(cluster: Cluster, member: Member) -> Process:
    """`etcdctl lock LOCK_NAME` on `member`, from the host, holding it until signalled; returns once it holds it."""
    node = member.node
    argv = [node.etcdctl, "--endpoints=https://127.0.0.1:2379", f"--cacert={node.pki['ca']}",
            f"--cert={node.pki['client-cert']}", f"--key={node.pki['client-key']}", "lock", LOCK_NAME]  # fmt: skip
    holder = cluster.lab.spawn(node.namespace, argv, name="lock-holder")
    poll_until(lambda: LOCK_NAME in holder.log(), timeout=30, interval=0.1, message="the test to hold the lock")
    return holder


def overlapping_defrags(one: Member, two: Member, attempts: int = 5) -> int:
    """Start `etcdctl defrag` on both members at once, with no lock, until their intervals overlap; the try it took."""
    barrier = threading.Barrier(2)

    def defrag(member: Member) -> None:
        barrier.wait(timeout=10)
        assert member.node.etcd("defrag").returncode == 0

    for attempt in range(1, attempts + 1):
        with ThreadPoolExecutor(max_workers=2) as pool:
            for done in [pool.submit(defrag, member) for member in (one, two)]:
                done.result(timeout=60)
        (start_one, end_one), (start_two, end_two) = one.defrag_intervals()[-1], two.defrag_intervals()[-1]
        if start_one < end_two and start_two < end_one:
            return attempt
    raise AssertionError(f"{attempts} unlocked defragmentations started together never overlapped")


def test_two_members_started_together_defragment_one_after_the_other_and_shrink(cluster: Cluster) -> None:
    one, two, three = cluster.members
    put_values(one, LIVE_VALUES, prefix=LIVE_PREFIX)
    put_values(one, VALUES)
    delete_and_compact(one, TEST_PREFIX)
    freed = VALUES * VALUE_BYTES
    before = {item.node.host: item.db_size() for item in cluster.members}
    assert all(size >= freed + LIVE_VALUES * VALUE_BYTES for size in before.values()), before
    # The test takes the lock first, so both scripts pass their checks and then really wait for each other.
    holder = hold_lock(cluster, three)
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = time.monotonic()
        runs = [pool.submit(item.run, maintenance_script(item.node.host, 24)) for item in (one, two)]
        # The holder's key and one waiting key per script.
        poll_until(lambda: len(lock_keys(three)) == 3, timeout=60, interval=0.2, message="both scripts to wait")
        waited = time.monotonic() - started
        assert not one.defrag_intervals() and not two.defrag_intervals(), "a member defragmented without the lock"
        holder.stop(signal.SIGTERM, timeout=10)
        ran = [run.result(timeout=180) for run in runs]
    took = time.monotonic() - started
    for item, result in zip((one, two), ran, strict=True):
        assert result.returncode == 0, result.output
        assert "Finished defragmenting etcd member[https://127.0.0.1:2379]" in result.stdout, result.output
        assert item.status()["result"] == "defragmented", item.status()
    (first,), (second,) = one.defrag_intervals(), two.defrag_intervals()
    earlier, later = sorted((first, second))
    report(
        f"both scripts waiting on the lock after {waited:.1f}s; {one.node.host} defragmented {first[0]:%T.%f}-"
        f"{first[1]:%T.%f}, {two.node.host} {second[0]:%T.%f}-{second[1]:%T.%f}: "
        f"{(later[0] - earlier[1]).total_seconds() * 1000:.0f} ms apart; both scripts done in {took:.1f}s"
    )
    assert earlier[1] <= later[0], f"the two members defragmented at once: {first} and {second}"
    assert lock_keys(one) == [], "a lock key was left behind"
    # The control: the same two members told to defragment at the same moment without the lock do overlap (so the
    # check above can fail): they were both ready when the holder let go.
    tries = overlapping_defrags(one, two)
    report(f"without the lock, the two members' defragmentations overlapped on try {tries}")

    # The third member on its own, once the live keys are gone too; then a run that is not due looks at alarms only.
    delete_and_compact(one, LIVE_PREFIX)
    alone = three.run(maintenance_script(three.node.host, 24))
    assert alone.returncode == 0 and three.status()["result"] == "defragmented", alone.output
    after = {item.node.host: item.db_size() for item in cluster.members}
    report(f"database sizes before {before}, after {after}")
    for item in (one, two):
        assert after[item.node.host] <= before[item.node.host] - freed // 2, (item.node.host, before, after)
    assert after[three.node.host] < VALUE_BYTES, after
    again = three.run(maintenance_script(three.node.host, 24))
    assert again.returncode == 0 and "already done" in again.stdout, again.output
    assert len(three.defrag_intervals()) == 1


def test_with_a_member_down_the_others_skip_and_say_which(cluster: Cluster) -> None:
    one, two, _ = cluster.members
    two.process.stop(signal.SIGTERM, timeout=15)
    try:
        stamp = time.time() - 2 * 86400  # the last defragmentation, two days ago: due
        os.utime(one.status_path, (stamp, stamp))
        defragmented = len(one.defrag_intervals())
        ran = one.run(maintenance_script(one.node.host, 24))
        why = f"2 of 3 members healthy (unhealthy: https://{two.member.address}:2379; unstarted: 0)"
        assert ran.returncode == 0, ran.output
        assert f"<4>kubeadm-ha: skipped defragmenting the member on {one.node.host}: {why}" in ran.stderr, ran.output
        assert one.status()["result"] == "skipped" and one.status()["detail"] == why, one.status()
        assert len(one.defrag_intervals()) == defragmented, "a member defragmented with another one down"
        report(f"with {two.node.host} down, {one.node.host} skipped: {why}")
    finally:
        two.restart(cluster)


def test_a_real_nospace_alarm_fails_the_run_and_the_operator_commands_clear_it(cluster: Cluster) -> None:
    one, _, three = cluster.members
    # The third member again, now with a tiny quota: its database is the first to outgrow it.
    flags = [flag for flag in three.flags() if not flag.startswith("--quota-backend-bytes=")]
    three.restart(cluster, *flags, f"--quota-backend-bytes={TINY_QUOTA}")
    went_in = put_values(one, 4 * TINY_QUOTA // VALUE_BYTES, until_refused=True)
    alarmed = poll_until(
        lambda: "alarm:NOSPACE" in (found := one.node.etcd("alarm", "list")).stdout and found.stdout,
        timeout=30, interval=0.3, message="etcd to raise NOSPACE",
    )  # fmt: skip
    report(f"NOSPACE after {went_in} values of 1 MiB: {alarmed.strip()}")
    for item in (one, three):
        ran = item.run(maintenance_script(item.node.host, 24))
        assert ran.returncode == ALARM_EXIT, ran.output
        assert f"<2>kubeadm-ha: etcd ALARM NOSPACE raised (seen from {item.node.host})" in ran.stderr, ran.output
        status = item.status()
        assert (status["result"], status["alarms"]) == ("alarm", "NOSPACE"), status
    assert len(three.defrag_intervals()) == 0, "a member defragmented while NOSPACE was raised"

    # The README's procedure: look, free the space, compact, defragment each member in turn, disarm.
    looked = one.operator(OPERATOR_LOOK)
    assert looked.returncode == 0 and "alarm:NOSPACE" in looked.stdout, looked.output
    freed = one.operator(f"etcdctl del --prefix {TEST_PREFIX}", OPERATOR_COMPACT)
    assert freed.returncode == 0 and "compacted revision" in freed.stdout, freed.output
    for item in cluster.members:
        defragmented = item.operator(OPERATOR_DEFRAG)
        assert defragmented.returncode == 0 and "Finished defragmenting" in defragmented.stdout, defragmented.output
    disarmed = one.operator(OPERATOR_DISARM)
    assert disarmed.returncode == 0 and disarmed.stdout.count("alarm:NOSPACE") == 1, disarmed.output
    assert one.node.etcd("put", f"{TEST_PREFIX}after", "ok").returncode == 0
    # The timer's next run is back to normal.
    ran = three.run(maintenance_script(three.node.host, 24))
    assert ran.returncode == 0 and three.status()["result"] == "defragmented", ran.output
    report(f"cleared by the README's commands; {three.node.host} at {three.db_size()} bytes, quota {TINY_QUOTA}")
