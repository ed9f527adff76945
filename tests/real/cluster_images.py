"""The cluster lab's images (tests/real/cluster-lab): tests/real/oci_images.py's, with the userland two of them need.

oci_images.py writes every image kubeadm and flannel's manifest name from the cached binaries alone; two of them
cannot work that way on a real node:
- kube-proxy (iptables mode, kubeadm's default) runs iptables-restore, iptables-save, conntrack and, in its checks,
  ipset and modprobe, inside its container;
- flanneld with --ip-masq (kube-flannel.yml) runs iptables (the manifest's net-conf.json sets EnableNFTables false).
Upstream's images carry that userland (distroless-iptables, alpine). Here both get a Debian 13 (trixie) root file
system as their first layer, made by mmdebstrap from Debian's archive (variant essential + iptables, nftables,
conntrack, ipset, kmod, iproute2; no documentation), the same for both, and then oci_images' layer with the
binaries at upstream's paths. Debian's iptables is iptables-nft, as the guest image's: host and pods write the
same tables.
And one image of the lab's own for its test pods: Debian's statically linked busybox (busybox-static) as
/bin/busybox, named `kubeadm-ha.lab/busybox:<Debian version>`: it comes with the bundle like every other image.

The base layer is cached by its recipe (mmdebstrap runs with SOURCE_DATE_EPOCH, but the archive moves: cached,
not rebuilt to compare); the archives are deterministic given the base layer and the binaries.

    python -m tests.real.cluster_images --kubernetes-version 1.37.2 --out DIR

stdout: `REFERENCE PATH` lines, one per archive, as oci_images'.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.real import oci_images  # noqa: E402
from tests.real.oci_images import File, Image  # noqa: E402

CACHE = Path(os.environ.get("KUBEADM_HA_IMAGE_CACHE", "/var/tmp/kubeadm-ha/images"))
SUITE = "trixie"
BASE_PACKAGES = ("iptables", "nftables", "conntrack", "ipset", "kmod", "iproute2")
SOURCE_DATE_EPOCH = "1767225600"  # 2026-01-01
MMDEBSTRAP_TIMEOUT_SECONDS = 1800
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
# The images that get the Debian layer, by repository basename.
WITH_USERLAND = ("kube-proxy", "flannel")
BUSYBOX_REPOSITORY = "kubeadm-ha.lab/busybox"


def _recipe() -> str:
    return f"{SUITE} essential {','.join(BASE_PACKAGES)} {' '.join(_EXCLUDES)} {SOURCE_DATE_EPOCH}"


def base_rootfs() -> Path:
    """The Debian root file system as an (uncompressed) tar, built once per recipe."""
    key = hashlib.sha256(_recipe().encode()).hexdigest()[:12]
    out = CACHE / f"oci-base-{SUITE}-{key}" / "rootfs.tar"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.tar")
    argv = [
        "mmdebstrap",
        "--variant=essential",
        f"--include={','.join(BASE_PACKAGES)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDES),
        SUITE,
        str(partial),
    ]
    print(f"cluster_images: {' '.join(argv)}", file=sys.stderr, flush=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    done = subprocess.run(
        argv, env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=MMDEBSTRAP_TIMEOUT_SECONDS, check=False
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"cluster_images: mmdebstrap failed (exit {done.returncode})")
    partial.rename(out)
    return out


def _gzip_layer(source: Path, sink: io.BufferedWriter) -> tuple[str, str, int]:
    """A tar as a gzip'd layer (no name, mtime 0): (diff ID, digest, size)."""
    compressed = oci_images._Hashing(sink)
    plain = hashlib.sha256()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz,
        source.open("rb") as handle,
    ):
        while chunk := handle.read(1 << 20):
            plain.update(chunk)
            gz.write(chunk)
    return f"sha256:{plain.hexdigest()}", f"sha256:{compressed.digest.hexdigest()}", compressed.size


def write_layered_archive(image: Image, base: Path, out: Path) -> Path:
    """`image` on top of the `base` tar: an OCI image-layout tar with two layers, as oci_images.write_archive."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci-") as scratch:
        layers = []
        for number, write in enumerate(
            (lambda sink: _gzip_layer(base, sink), lambda sink: oci_images._write_layer(image.files, sink))
        ):
            path = Path(scratch) / f"layer{number}"
            with open(path, "wb") as sink:
                diff_id, digest, size = write(sink)
            layers.append((path, diff_id, digest, size))
        container: dict[str, object] = {"Env": list(image.env)}
        if image.entrypoint:
            container["Entrypoint"] = list(image.entrypoint)
        config = oci_images._json(
            {
                "architecture": image.architecture,
                "os": "linux",
                "config": container,
                "rootfs": {"type": "layers", "diff_ids": [layer[1] for layer in layers]},
                "history": [{"created_by": f"mmdebstrap {_recipe()}"}, {"created_by": "tests/real/cluster_images.py"}],
            }
        )
        manifest = oci_images._json(
            {
                "schemaVersion": 2,
                "mediaType": oci_images.MANIFEST,
                "config": oci_images._descriptor(oci_images.CONFIG, config),
                "layers": [{"mediaType": oci_images.LAYER, "digest": d, "size": s} for _, _, d, s in layers],
            }
        )
        entry = {
            **oci_images._descriptor(oci_images.MANIFEST, manifest),
            "platform": {"architecture": image.architecture, "os": "linux"},
            "annotations": {oci_images.REF_NAME: image.reference, oci_images.CONTAINERD_NAME: image.reference},
        }
        index = oci_images._json({"schemaVersion": 2, "mediaType": oci_images.INDEX, "manifests": [entry]})
        blobs: dict[str, bytes | Path] = {
            oci_images.digest_of(config): config,
            oci_images.digest_of(manifest): manifest,
        }
        blobs.update({digest.removeprefix("sha256:"): path for path, _, digest, _ in layers})
        partial = Path(scratch) / "archive.tar"
        info = oci_images._info
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info("blobs", tarfile.DIRTYPE, 0o755))
            tar.addfile(info("blobs/sha256", tarfile.DIRTYPE, 0o755))
            for digest in sorted(blobs):
                blob = blobs[digest]
                name = f"blobs/sha256/{digest}"
                if isinstance(blob, bytes):
                    tar.addfile(info(name, tarfile.REGTYPE, 0o644, len(blob)), io.BytesIO(blob))
                else:
                    with blob.open("rb") as handle:
                        tar.addfile(info(name, tarfile.REGTYPE, 0o644, blob.stat().st_size), handle)
            tar.addfile(info("index.json", tarfile.REGTYPE, 0o644, len(index)), io.BytesIO(index))
            layout = oci_images._json({"imageLayoutVersion": "1.0.0"})
            tar.addfile(info("oci-layout", tarfile.REGTYPE, 0o644, len(layout)), io.BytesIO(layout))
        partial.rename(out)
    return out


def busybox_image() -> Image:
    version = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "busybox-static"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not version or not oci_images.BUSYBOX.is_file():
        raise SystemExit("cluster_images: the test pods' image needs Debian's busybox-static: apt-get install it")
    tag = version.split(":")[-1].replace("+", "_")
    files = {"/bin/busybox": File(oci_images.BUSYBOX)}
    return Image(f"{BUSYBOX_REPOSITORY}:{tag}", files, entrypoint=("/bin/busybox",))


def write_all(kubernetes_version: str, out: Path) -> list[tuple[str, Path]]:
    written = []
    base = base_rootfs()
    for image in [*oci_images.kubeadm_images(kubernetes_version), busybox_image()]:
        target = out / oci_images.archive_name(image.reference)
        repository = image.reference.rpartition(":")[0].rpartition("/")[2]
        if repository in WITH_USERLAND:
            write_layered_archive(image, base, target)
        else:
            oci_images.write_archive(image, target)
        written.append((image.reference, target))
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.real.cluster_images")
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    for reference, path in write_all(args.kubernetes_version.removeprefix("v"), args.out.resolve()):
        print(f"{reference} {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
