"""The bundle step's checks after a pipe (render/artifacts.py), found by the real-cluster lab (tests/real/cluster-lab):
`ctr images ls --quiet | grep -qxF NAME` and `kubectl version --client | grep -qwF vX` failed at random on real nodes
("imported, but containerd has no image ...", "bin/kubectl is not kubectl v1.37.2") although both were right: grep -q
exits at its first match, the writer's next line then gets SIGPIPE, and the script's `set -o pipefail` makes that
the pipeline's status. The rendered lines are run here with a `ctr` that answers like the real one, in two writes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from model.bundle import BINARIES, Entry, Manifest, kubeadm_images
from render.artifacts import BundleInstall, bundle_install_script

VERSION = "1.37.2"
SHA = "a" * 64


def _install() -> BundleInstall:
    entries = [Entry(f"bin/{name}", SHA, 1, "binary", name, VERSION) for name in BINARIES if name != "etcdctl"]
    entries += [
        Entry(f"images/{i}.tar", SHA, 1, "image", name, name.rsplit(":", 1)[1])
        for i, name in enumerate(kubeadm_images(VERSION))
    ]
    return BundleInstall(Manifest(VERSION, "amd64", tuple(entries)), SHA, "bundle", False, "cp")


def _image_checks() -> list[str]:
    rendered = bundle_install_script("cp-1", _install()).render()
    return [line for line in rendered.splitlines() if line.startswith("ctr ") and " images ls " in line]


def test_no_check_pipes_into_grep_q() -> None:
    rendered = bundle_install_script("cp-1", _install()).render()
    assert not re.search(r"\|\s*grep -q", rendered)
    assert len(_image_checks()) == len(kubeadm_images(VERSION))


def test_an_imported_image_listed_before_others_passes_the_check(tmp_path: Path) -> None:
    """The named image first, then the rest after a pause: what `ctr images ls --quiet` prints on a node."""
    check = _image_checks()[0]
    name = re.search(r"grep -x?F (\S+)", check)
    assert name is not None
    stub = tmp_path / "ctr"
    others = "for i in $(seq 1 2000); do echo other/image:$i; done"
    stub.write_text(f"#!/bin/sh\necho {name.group(1)}\nsleep 0.3\n{others}\n")
    stub.chmod(0o755)
    script = f'set -euo pipefail\nkha_bundle_fail() {{ echo FAILED: "$*"; exit 1; }}\n{check}\necho PASSED\n'
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("PASSED"), done.stdout + done.stderr
