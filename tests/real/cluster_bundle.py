"""The cluster lab's inputs, built or taken from their caches: the toolchain and node binaries
(tests/real/build-binaries), the OCI images (tests/real/cluster_images.py), the artifact bundle (`python -m
tools.bundle assemble --from`) and the guest image (tests/real/cluster-image).

Caches (outside the repository):
- binaries: build-binaries' own, by version;
- images: KUBEADM_HA_IMAGE_CACHE/cluster-oci-<key>/, the key a digest of the image recipes (oci_images.py,
  cluster_images.py, lab_binaries.py) and of every binary the images hold;
- bundle: KUBEADM_HA_IMAGE_CACHE/cluster-bundle-<key>/, the key a digest of the source files' paths and digests;
- guest image: cluster-image's own, by its content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model.bundle import REQUIRED_CNI_PLUGINS, file_digest
from tests.real import cluster_images, lab_binaries, oci_images
from tests.real.engine import toolchain

ROOT = toolchain.ROOT
BUILD = ROOT / "tests" / "real" / "build-binaries"
CLUSTER_IMAGE = ROOT / "tests" / "real" / "cluster-image"
CACHE = cluster_images.CACHE
NODE_BINARIES = ("kubeadm", "kubelet", "kubectl", "containerd", "ctr", "containerd-shim-runc-v2", "runc", "crictl")
BUILD_TIMEOUT_SECONDS = 3600
IMAGE_TIMEOUT_SECONDS = 2400


@dataclass(frozen=True)
class Inputs:
    binaries: dict[str, Path]  # name -> cached path (node binaries and CNI plugins)
    bundle: Path
    bundle_sha256: str
    guest_image: Path  # disk.qcow2


def build(names: list[str]) -> dict[str, Path]:
    """`build-binaries NAME...` (cached by version): name -> path."""
    done = subprocess.run(
        [sys.executable, str(BUILD), *names],
        stdout=subprocess.PIPE,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"build-binaries {' '.join(names)} failed (exit {done.returncode})")
    found = {}
    for line in done.stdout.splitlines():
        name, _version, path = line.split()
        found[name] = Path(path)
    return found


def _key(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def images(kubernetes_version: str) -> Path:
    """The directory of OCI archives, written once per recipe and binaries."""
    recipes = [Path(module.__file__ or "").read_text() for module in (oci_images, cluster_images, lab_binaries)]
    kubeadm = build([f"kubeadm@{kubernetes_version}"])["kubeadm"]
    key = _key([*recipes, kubernetes_version, file_digest(kubeadm), cluster_images.base_rootfs().name])
    out = CACHE / f"cluster-oci-{key}"
    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cluster_images.write_all(kubernetes_version, out)
    (out / ".complete").write_text("")
    return out


def flannel_manifest() -> Path:
    group = lab_binaries.GO_NAMES["flanneld"]
    work = Path(tempfile.mkdtemp(prefix="cluster-lab-flannel-"))
    try:
        (work / "go.mod").write_text("module kubeadmha.test/images\n\ngo 1.22\n")
        return lab_binaries.module_dir(group.module, group.version, work) / oci_images.FLANNEL_MANIFEST
    finally:
        shutil.rmtree(work, ignore_errors=True)


def source_dir(binaries: dict[str, Path], image_dir: Path, into: Path) -> Path:
    """tools.bundle's --from layout: bin/, cni/, manifests/flannel.yaml, images/ (symlinks into the caches)."""
    for sub in ("bin", "cni", "manifests", "images"):
        (into / sub).mkdir(parents=True, exist_ok=True)
    for name in NODE_BINARIES:
        (into / "bin" / name).symlink_to(binaries[name])
    for name in REQUIRED_CNI_PLUGINS:
        (into / "cni" / name).symlink_to(binaries[name])
    (into / "manifests" / "flannel.yaml").symlink_to(flannel_manifest())
    for archive in sorted(image_dir.glob("*.tar")):
        (into / "images" / archive.name).symlink_to(archive)
    return into


def assemble(source: Path, project_dir: Path, stack: str) -> tuple[Path, str]:
    """The bundle for `source`, assembled once per set of source digests: (directory, manifest sha256)."""
    listed = sorted(path for path in source.rglob("*") if path.is_file())
    key = _key([f"{path.relative_to(source)} {file_digest(path)}" for path in listed])
    out = CACHE / f"cluster-bundle-{key}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-m", "tools.bundle", "assemble", "--stack", stack]
        argv += ["--project-dir", str(project_dir), "--out", str(out), "--from", str(source)]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise RuntimeError(f"tools.bundle assemble failed: {done.stderr.strip()[-2000:]}")
    argv = [sys.executable, "-m", "tools.bundle", "check", str(out), "--stack", stack]
    argv += ["--project-dir", str(project_dir)]
    checked = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if checked.returncode != 0:
        raise RuntimeError(f"tools.bundle check failed: {checked.stderr.strip()[-2000:]}")
    sha = checked.stdout.split("manifest sha256 ", 1)[1].split()[0]
    # QEMU's user does not read it, but the program's copy runs as root from here; keep it world-readable anyway.
    os.chmod(out, 0o755)
    return out, sha


def guest_image() -> Path:
    built = subprocess.run(
        [str(CLUSTER_IMAGE)], capture_output=True, text=True, timeout=IMAGE_TIMEOUT_SECONDS, check=False
    )
    if built.returncode != 0:
        raise RuntimeError(f"cluster-image failed:\n{built.stderr[-3000:]}")
    return Path(built.stdout.strip().splitlines()[-1]) / "disk.qcow2"
