"""`kha_etcdctl`'s image lookup (render/backup.py `etcd_tool_functions`), run by bash as the steps run it:
under `set -euo pipefail`, outside any `if`.

Found by running tools.drill's production target against the stacked lab: `etcd_image` read the live manifest
and the restore-held one with one `sed`, which exits 2 when one of them is missing (always, outside a restore);
under pipefail that ended every script that called `kha_etcdctl` directly. The backup and restore scripts call
it inside `if` or `||`, where errexit is off, so only the drill's queries failed: on every node, always.
`ctr` cannot run here; a stand-in prints the image and command it is given.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from render.backup import HELD_MANIFEST_DIR, etcd_tool_functions
from render.etcd import MANIFEST_PATH
from render.etcd_restore import quorum_probe_script

LIVE = "registry.k8s.io/etcd:3.7.0-0"
HELD = "registry.k8s.io/etcd:3.6.8-0"


def manifest(image: str) -> str:
    return (
        "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - command:\n    - etcd\n"
        f"    image: {image}\n    name: etcd\n  - image: registry.k8s.io/pause:3.10\n    name: second\n"
    )


# The stand-ins for `ctr`: one prints the image and the command it was asked to run, one fails as ctr does
# when the image is not on the node.
ECHO_CTR = '#!/bin/sh\nshift 3\nwhile [ "${1#--}" != "$1" ]; do shift; done\necho "$1 $3"\n'
FAILING_CTR = '#!/bin/sh\necho "ctr: image not found" >&2\nexit 1\n'


def with_functions(body: str) -> str:
    """`body` after the rendered functions, under the steps' shell options."""
    functions = "\n".join(etcd_tool_functions(writable=()))
    return f"set -euo pipefail\nKUBEADM_HA_HOST=etcd-1\n{functions}\n{body}\necho end"


def run(
    tmp_path: Path, script: str, *, live: str | None, held: str | None, ctr: str = ECHO_CTR
) -> subprocess.CompletedProcess[str]:
    """`script` by bash, its manifest paths moved under `tmp_path` (written for the images given), `ctr` on PATH."""
    paths = {MANIFEST_PATH: tmp_path / "manifests/etcd.yaml", f"{HELD_MANIFEST_DIR}/etcd.yaml": tmp_path / "held.yaml"}
    for path, image in zip(paths.values(), (live, held), strict=True):
        if image is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(manifest(image))
    for original, moved in paths.items():
        script = script.replace(original, str(moved))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ctr").write_text(ctr)
    (bin_dir / "ctr").chmod(0o755)
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.parametrize(
    ("live", "held", "image"),
    [(LIVE, None, LIVE), (None, HELD, HELD), (LIVE, HELD, LIVE)],
    ids=["running", "held-by-a-restore", "both"],
)
def test_the_image_comes_from_the_manifest_there_is_outside_an_if(
    tmp_path: Path, live: str | None, held: str | None, image: str
) -> None:
    found = run(tmp_path, with_functions("etcd_image\nkha_etcdctl endpoint status"), live=live, held=held)
    assert found.returncode == 0, found.stderr
    assert found.stdout == f"{image}\n{image} etcdctl\nend\n"


def test_no_manifest_at_all_is_a_named_failure(tmp_path: Path) -> None:
    found = run(tmp_path, with_functions("kha_etcdctl endpoint status"), live=None, held=None)
    assert found.returncode == 1
    assert "kubeadm-ha: no etcd manifest on etcd-1 to take the etcd image from" in found.stderr
    assert "end" not in found.stdout


def test_the_quorum_probe_fails_when_etcdctl_cannot_run(tmp_path: Path) -> None:
    """A `no-quorum` from a node where etcdctl never ran would let tools.etcd_restore go ahead without --force."""
    ran = run(tmp_path, quorum_probe_script("etcd-1").render(), live=LIVE, held=None, ctr=FAILING_CTR)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "quorum" not in ran.stdout
    assert "kubeadm-ha: etcdctl cannot run on etcd-1" in ran.stderr and "ctr: image not found" in ran.stderr
