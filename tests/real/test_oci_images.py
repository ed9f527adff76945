"""The OCI image archives tests/real/oci_images.py writes, imported by the real consumer: containerd 2.2's `ctr -n
k8s.io images import`, as an air-gapped node would load kubeadm's images.

Real: containerd (daemon and ctr, built by tests/real/build-binaries, its own config, root, state and socket in a
network namespace, as tests/real/test_ctr_etcd_tools.py runs it), the pause binary compiled from Kubernetes' pause.c,
the archive. Only the pause image is imported: it is small, and the writer is the same for every image.

Proven: the archive is byte-identical when written twice; ctr names the image exactly the reference kubeadm 1.37.2
lists (registry.k8s.io/pause:3.10.2), its target is the manifest the archive's index.json points at, `ctr images
check` finds every blob present (complete), and the layer and config in containerd's content store are the bytes
written, with the entrypoint and user given; `ctr run` unpacks it and runs /pause as uid/gid 65535 (Debian's runc,
found on PATH as on a node) until SIGTERM stops it.

Runs as root; needs iproute2, util-linux (nsenter), runc (Debian), and
tests/real/build-binaries containerd ctr containerd-shim-runc-v2 pause. Under CI=true missing ones fail.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import require_programs, require_root, unavailable
from tests.integration.netns import Lab, cleanup_stale, poll_until, scratch_dir
from tests.real import lab_binaries
from tests.real.binaries import _builder, binary
from tests.real.oci_images import File, Image, write_archive
from tests.real.test_ctr_etcd_tools import HostState, start_containerd, stop_containerd

pytestmark = pytest.mark.real

NAMESPACE = "k8s.io"
REFERENCE = f"registry.k8s.io/pause:{lab_binaries.PAUSE_VERSION}"  # kubeadm 1.37.2's PauseVersion
CTR_BOUND = 60.0
CONTAINER = "kubeadm-ha-oci-pause"


def pause_image() -> Image:
    path = lab_binaries.cached_path("pause", lab_binaries.PAUSE_VERSION, Path(_builder().CACHE))
    if not path.is_file():
        unavailable(f"pause is not built: run tests/real/build-binaries pause@{lab_binaries.PAUSE_VERSION}")
    return Image(REFERENCE, {"/pause": File(path)}, entrypoint=("/pause",), user="65535:65535")


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_ctr_imports_the_pause_archive_under_its_reference() -> None:
    require_root()
    programs = require_programs("ip", "nsenter", "runc", "umount")
    binaries = {name: binary(name) for name in ("containerd", "ctr", "containerd-shim-runc-v2")}
    image = pause_image()
    cleanup_stale()
    work = scratch_dir("oci")
    host_state = HostState.before(work)
    lab = Lab("oci", log_dir=work / "logs")
    try:
        archive = write_archive(image, work / "pause.tar")
        again = write_archive(image, work / "again" / "pause.tar")
        assert archive.read_bytes() == again.read_bytes(), "the same image wrote two different archives"
        written = members(archive)
        assert written["oci-layout"] == b'{"imageLayoutVersion":"1.0.0"}'
        (entry,) = json.loads(written["index.json"])["manifests"]
        manifest = json.loads(written[f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}"])

        socket = start_containerd(lab, lab.namespace("node"), work, binaries, programs["nsenter"])

        def ctr(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [binaries["ctr"], "--address", str(socket), "--namespace", NAMESPACE, *args],
                capture_output=True, timeout=CTR_BOUND, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip

        imported = ctr("images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr.decode()
        listed = ctr("images", "ls", "-q")
        assert listed.stdout.decode().split() == [REFERENCE], listed.stdout + listed.stderr

        # Its target is the manifest the index points at; `check` finds every blob the manifest names.
        table = ctr("images", "ls").stdout.decode().splitlines()
        row = next(line.split() for line in table[1:] if line.split()[0] == REFERENCE)
        assert entry["digest"] in row, table
        checked = ctr("images", "check").stdout.decode().splitlines()
        assert len(checked) == 2 and checked[1].split()[0] == REFERENCE, checked
        assert "complete" in checked[1].split()[3], checked  # STATUS: complete (N/N)

        # containerd's content store holds the bytes written.
        for descriptor in (manifest["config"], *manifest["layers"]):
            got = ctr("content", "get", descriptor["digest"])
            assert got.returncode == 0, got.stderr.decode()
            assert got.stdout == written[f"blobs/sha256/{descriptor['digest'].removeprefix('sha256:')}"]
        config = json.loads(ctr("content", "get", manifest["config"]["digest"]).stdout)
        assert config["config"]["Entrypoint"] == ["/pause"] and config["config"]["User"] == "65535:65535"
        layer = ctr("content", "get", manifest["layers"][0]["digest"]).stdout
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:gz") as tar:
            pause = tar.getmember("pause")
            assert (pause.mode, pause.uid, pause.gid, pause.mtime) == (0o755, 0, 0, 0)
            content = tar.extractfile(pause).read()  # type: ignore[union-attr]
        assert hashlib.sha256(content).digest() == hashlib.sha256(image.files["/pause"].source.read_bytes()).digest()
        assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(gzip.decompress(layer)).hexdigest()}"]

        # Unpacked and run as the image says (entrypoint /pause, user 65535): a running task, which SIGTERM ends.
        started = ctr("run", "-d", "--net-host", REFERENCE, CONTAINER)
        assert started.returncode == 0, started.stderr.decode()

        def task_status() -> str:
            tasks = [line.split() for line in ctr("tasks", "ls").stdout.decode().splitlines()[1:]]
            return next((row[2] for row in tasks if row[0] == CONTAINER), "")

        poll_until(lambda: task_status() == "RUNNING", timeout=CTR_BOUND, interval=0.2, message="pause to run")
        info = json.loads(ctr("containers", "info", CONTAINER).stdout)
        assert info["Spec"]["process"]["args"] == ["/pause"], info["Spec"]["process"]
        assert (info["Spec"]["process"]["user"]["uid"], info["Spec"]["process"]["user"]["gid"]) == (65535, 65535)
        assert ctr("tasks", "kill", "--signal", "SIGTERM", CONTAINER).returncode == 0
        poll_until(lambda: task_status() == "STOPPED", timeout=CTR_BOUND, interval=0.2, message="pause to stop")
        assert ctr("tasks", "rm", CONTAINER).returncode == 0
        assert ctr("containers", "rm", CONTAINER).returncode == 0
    except BaseException:
        print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs(tail=30)}")
        raise
    finally:
        if (work / "containerd.sock").exists():
            # Through the daemon first, so a task a failed assertion left takes its runc state and mounts with it.
            for args in (("tasks", "kill", "--signal", "SIGKILL"), ("tasks", "rm", "--force"), ("containers", "rm")):
                subprocess.run([binaries["ctr"], "--address", str(work / "containerd.sock"), "--namespace", NAMESPACE,
                                *args, CONTAINER], capture_output=True, timeout=CTR_BOUND, check=False)  # fmt: skip
        stop_containerd(lab)
        lab.close()
        host_state.restore(programs["runc"])
