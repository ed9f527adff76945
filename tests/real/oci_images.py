"""OCI image archives for an air-gapped lab (issue 21), written with the standard library from the binaries
tests/real/build-binaries caches: test-only, like the rest of tests/real.

`write_archive` writes one OCI image-layout tar (oci-layout, index.json, blobs/sha256/...) holding one linux/amd64
image: one gzip'd layer built from given files, a config with the given Entrypoint/Cmd/Env/User, and an index entry
annotated with the full reference under both `org.opencontainers.image.ref.name` and `io.containerd.image.name`, so
that `ctr -n k8s.io images import ARCHIVE` names the image exactly that. Deterministic: the same inputs give a
byte-identical archive (every mtime 0, uid/gid 0, no user or group names, sorted entries, gzip header without name
or time, JSON with sorted keys).

    python -m tests.real.oci_images kubeadm-images --kubernetes-version 1.37.2 --out DIR

writes one archive per image `kubeadm config images list` names for that release (the cached kubeadm is asked) and
per image flannel's kube-flannel.yml names, each DIR/<repository basename>_<tag>.tar; stdout: `REFERENCE PATH` lines.

What these images are, next to the upstream ones (each holds only what is said here, on no base image):
- kube-apiserver, kube-controller-manager, kube-scheduler: the binary at /usr/local/bin/NAME, as upstream. Upstream's
  entrypoint is /go-runner (kube-log-runner), which ours lacks: the entrypoint is the binary itself. kubeadm's static
  Pod manifests give `command:` (the bare name, found on PATH), so neither is used there. Upstream's kube-apiserver
  also carries cap_net_bind_service on the binary; ours does not (kubeadm's port 6443 needs none).
- kube-proxy: /usr/local/bin/kube-proxy only. Upstream's image is distroless-iptables: it carries the iptables,
  ip6tables, iptables-nft/-legacy, ipset and conntrack userland kube-proxy runs in its iptables (the default) and
  ipvs modes, and nft for nftables mode's checks. Ours has none of them, so kube-proxy cannot program its rules in
  either iptables or ipvs mode; which `--proxy-mode` (nftables talks netlink itself) the lab should use, or whether
  the userland must come in, is left for later.
- etcd (tag 3.7.0-0): etcd, etcdctl and etcdutl at /usr/local/bin, PATH set, as upstream; kubeadm's manifest runs
  `etcd` from PATH. Upstream's etcd image has nothing else that etcd needs.
- coredns: /coredns, entrypoint /coredns, user 65532 (upstream's nonroot, by number: there is no /etc/passwd), and
  the file capability cap_net_bind_service=+ep upstream sets on it (a security.capability xattr in the layer), so the
  non-root server can bind port 53. Upstream's distroless base also has CA certificates and tzdata; ours has neither
  (the `forward` plugin over TLS and time zones are not used by kubeadm's Corefile).
- pause: /pause, entrypoint /pause, user 65535:65535, as upstream.
- flannel (ghcr.io/flannel-io/flannel): /opt/bin/flanneld (entrypoint) and /opt/bin/install-conf, which the manifest
  runs. Upstream's alpine base carries iptables (nft and legacy, behind iptables-wrapper), ip6tables, nftables,
  iproute2, strongswan, wireguard-tools and CA certificates; ours has none: flanneld's --ip-masq rules (iptables,
  as `EnableNFTables: false` in the manifest's net-conf.json says) cannot be written without the iptables binary.
- flannel-cni-plugin (ghcr.io/flannel-io/flannel-cni-plugin): /flannel, the plugin the manifest's init container
  copies with `cp -f /flannel /opt/cni/bin/flannel`; `cp` is Debian's statically linked busybox (busybox-static)
  at /bin/cp (busybox runs the applet named by argv[0]), where upstream's alpine base has busybox too. The plugin is
  plugins/meta/flannel of github.com/containernetworking/plugins v0.9.1, not flannel-io/cni-plugin v1.9.1-flannel3,
  which the Go module proxy refuses (tests/real/lab_binaries.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.real import lab_binaries  # noqa: E402

BUILD_SCRIPT = Path(__file__).with_name("build-binaries")
CACHE = Path(os.environ.get("KUBEADM_HA_BIN_CACHE", Path.home() / ".cache" / "kubeadm-ha" / "bin"))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# flannel's manifest at the version the lab applies (lab_binaries' flannel group), read for its image references.
FLANNEL_MANIFEST = "Documentation/kube-flannel.yml"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# cap_net_bind_service=+ep as `setcap` writes it: struct vfs_cap_data, revision 2, effective, permitted bit 10.
CAP_NET_BIND_SERVICE = struct.pack("<5I", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)


@dataclass(frozen=True)
class File:
    """A file of the layer: the local file's content, the given mode, uid/gid 0, and extended attributes."""

    source: Path
    mode: int = 0o755
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    reference: str  # the full name, e.g. registry.k8s.io/pause:3.10.2
    files: dict[str, File]  # path in the image (absolute) -> file
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (PATH_ENV,)
    user: str = ""
    architecture: str = "amd64"


class _Hashing(io.RawIOBase):
    """Writes through to `sink`, counting and hashing what passes."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _parents(paths: Iterable[str]) -> list[str]:
    parents: set[str] = set()
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        parents.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(parents)


def _write_layer(files: dict[str, File], sink: BinaryIO) -> tuple[str, str, int]:
    """The gzip'd layer tar into `sink`; (diff ID, digest, size) as sha256:... and bytes."""
    compressed = _Hashing(sink)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        plain = _Hashing(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for directory in _parents(files):
                tar.addfile(_info(directory, tarfile.DIRTYPE, 0o755))
            for path in sorted(files, key=lambda p: p.strip("/")):
                file = files[path]
                info = _info(path.strip("/"), tarfile.REGTYPE, file.mode, file.source.stat().st_size)
                # Binary values go through as surrogate escapes; tarfile marks the header hdrcharset=BINARY.
                info.pax_headers = {
                    f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
                    for key, value in file.xattrs.items()
                }
                with open(file.source, "rb") as handle:
                    tar.addfile(info, handle)
    return f"sha256:{plain.digest.hexdigest()}", f"sha256:{compressed.digest.hexdigest()}", compressed.size


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(data).hexdigest()}", "size": len(data)}


def write_archive(image: Image, out: Path) -> Path:
    """`image` as an OCI image-layout tar at `out` (written beside it, then renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in image.files:
        if not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"{image.reference}: {path!r} is not an absolute file path")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci-") as scratch:
        layer_path = Path(scratch) / "layer"
        with open(layer_path, "wb") as layer:
            diff_id, layer_digest, layer_size = _write_layer(image.files, layer)
        container: dict[str, object] = {"Env": list(image.env)}
        if image.entrypoint:
            container["Entrypoint"] = list(image.entrypoint)
        if image.cmd:
            container["Cmd"] = list(image.cmd)
        if image.user:
            container["User"] = image.user
        config = _json(
            {
                "architecture": image.architecture,
                "os": "linux",
                "config": container,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "kubeadm-ha tests/real/oci_images.py"}],
            }
        )
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": _descriptor(CONFIG, config),
                "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer_size}],
            }
        )
        entry = {
            **_descriptor(MANIFEST, manifest),
            "platform": {"architecture": image.architecture, "os": "linux"},
            "annotations": {REF_NAME: image.reference, CONTAINERD_NAME: image.reference},
        }
        index = _json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry]})
        blobs = {digest_of(config): config, digest_of(manifest): manifest}
        partial = Path(scratch) / "archive.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info("blobs", tarfile.DIRTYPE, 0o755))
            tar.addfile(_info("blobs/sha256", tarfile.DIRTYPE, 0o755))
            for digest in sorted([*blobs, layer_digest.removeprefix("sha256:")]):
                name = f"blobs/sha256/{digest}"
                if digest in blobs:
                    tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(blobs[digest])), io.BytesIO(blobs[digest]))
                else:
                    with open(layer_path, "rb") as handle:
                        tar.addfile(_info(name, tarfile.REGTYPE, 0o644, layer_size), handle)
            tar.addfile(_info("index.json", tarfile.REGTYPE, 0o644, len(index)), io.BytesIO(index))
            layout = _json({"imageLayoutVersion": "1.0.0"})
            tar.addfile(_info("oci-layout", tarfile.REGTYPE, 0o644, len(layout)), io.BytesIO(layout))
        partial.rename(out)
    return out


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- kubeadm's images


def built(name: str, version: str) -> Path:
    """The cached binary `build-binaries NAME@VERSION` prints, built first when missing (etcd names: VERSION is the
    Kubernetes release, whose pinned etcd is built)."""
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), f"{name}@{version}"], stdout=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"oci_images: build-binaries {name}@{version} failed (exit {result.returncode})")
    return Path(result.stdout.split()[2])


def kubeadm_image_list(kubeadm: Path, kubernetes_version: str) -> list[str]:
    result = subprocess.run(
        [str(kubeadm), "config", "images", "list", f"--kubernetes-version=v{kubernetes_version}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"oci_images: kubeadm config images list failed: {result.stderr.strip()}")
    return result.stdout.split()


def flannel_image_references() -> list[str]:
    """The images kube-flannel.yml of the lab's flannel release names, in the order they first appear."""
    group = lab_binaries.GO_NAMES["flanneld"]
    with tempfile.TemporaryDirectory() as work:
        Path(work, "go.mod").write_text("module kubeadmha.test/images\n\ngo 1.22\n")
        source = lab_binaries.module_dir(group.module, group.version, Path(work))
    found = re.findall(r"^\s*image:\s*(\S+)\s*$", (source / FLANNEL_MANIFEST).read_text(), re.M)
    return list(dict.fromkeys(found))


def _tag(reference: str) -> str:
    return reference.rpartition(":")[2]


def kubeadm_images(kubernetes_version: str) -> list[Image]:
    """Every image kubeadm lists for the release, then flannel's, from the cached binaries (built when missing)."""
    images = []
    for reference in kubeadm_image_list(built("kubeadm", kubernetes_version), kubernetes_version):
        repository = reference.rpartition(":")[0].rpartition("/")[2]
        if repository in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"):
            if _tag(reference) != f"v{kubernetes_version}":
                raise SystemExit(f"oci_images: kubeadm names {reference} for Kubernetes {kubernetes_version}")
            binary = built(repository, kubernetes_version)
            path = f"/usr/local/bin/{repository}"
            images.append(Image(reference, {path: File(binary)}, entrypoint=(path,)))
        elif repository == "etcd":
            # kubeadm's tags are VERSION-N; the `-N` is the image's revision, the etcd inside is VERSION.
            etcd = _tag(reference).removeprefix("v").partition("-")[0]
            tools = {
                f"/usr/local/bin/{name}": File(built(name, kubernetes_version))
                for name in ("etcd", "etcdctl", "etcdutl")
            }
            if any(f"/etcd/{etcd}/" not in str(tool.source) for tool in tools.values()):
                raise SystemExit(
                    f"oci_images: kubeadm names {reference}, Kubernetes {kubernetes_version} pins another etcd"
                )
            images.append(Image(reference, tools, entrypoint=("/usr/local/bin/etcd",)))
        elif repository == "coredns":
            binary = built("coredns", _tag(reference).removeprefix("v"))
            files = {"/coredns": File(binary, xattrs={"security.capability": CAP_NET_BIND_SERVICE})}
            images.append(Image(reference, files, entrypoint=("/coredns",), user="65532:65532"))
        elif repository == "pause":
            binary = built("pause", _tag(reference))
            images.append(Image(reference, {"/pause": File(binary)}, entrypoint=("/pause",), user="65535:65535"))
        else:
            raise SystemExit(f"oci_images: kubeadm names {reference}, which this module has no recipe for")
    flannel_version = lab_binaries.GO_NAMES["flanneld"].version
    for reference in flannel_image_references():
        repository = reference.rpartition(":")[0].rpartition("/")[2]
        if repository == "flannel":
            if _tag(reference) != f"v{flannel_version}":
                raise SystemExit(f"oci_images: flannel's manifest names {reference}, not v{flannel_version}")
            files = {f"/opt/bin/{name}": File(built(name, flannel_version)) for name in ("flanneld", "install-conf")}
            images.append(Image(reference, files, entrypoint=("/opt/bin/flanneld",)))
        elif repository == "flannel-cni-plugin":
            if not BUSYBOX.is_file():
                raise SystemExit(f"oci_images: {reference} needs a static `cp`: apt-get install busybox-static")
            plugin = built("flannel", lab_binaries.default_version("flannel"))
            files = {"/flannel": File(plugin), "/bin/cp": File(BUSYBOX)}
            images.append(Image(reference, files))
        else:
            raise SystemExit(f"oci_images: flannel's manifest names {reference}, which this module has no recipe for")
    return images


def archive_name(reference: str) -> str:
    repository, _, tag = reference.rpartition(":")
    return f"{repository.rpartition('/')[2]}_{tag}.tar"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.real.oci_images")
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("kubeadm-images", help="one archive per image kubeadm (and flannel) names")
    images.add_argument("--kubernetes-version", required=True, help="e.g. 1.37.2")
    images.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    version = args.kubernetes_version.removeprefix("v")
    for image in kubeadm_images(version):
        out = write_archive(image, args.out.resolve() / archive_name(image.reference))
        print(f"{image.reference} {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
