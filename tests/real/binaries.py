"""The real binaries the tests run (Kubernetes, etcd, containerd, the Pulumi toolchain), as built and cached by
`tests/real/build-binaries`.

The tests never build: a Go build of kube-apiserver takes many minutes, far beyond any bound a test
should wait. `tests/run-all.sh` builds what the suite needs before pytest starts; a test whose binary is
not in the cache skips locally (saying which command builds it) and fails under CI=true.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from model.versions import DEFAULT_KUBERNETES, RELEASES, minor_of
from tests.integration.conftest import unavailable

BUILD_SCRIPT = Path(__file__).with_name("build-binaries")
# The oldest minor a new cluster may use; its kubeadm validates the documents of a stack set to it.
OLDEST_SUPPORTED = RELEASES["1.35"].latest_patch
# kubeadm for every version the documents are validated at, newest first.
KUBEADM_VERSIONS = (DEFAULT_KUBERNETES, OLDEST_SUPPORTED)


@functools.cache
def _builder() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("kubeadm_ha_build_binaries", str(BUILD_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def cached_path(name: str, kubernetes_version: str = DEFAULT_KUBERNETES) -> Path:
    """Where build-binaries keeps `name` for that Kubernetes release (etcd names: the etcd kubeadm pins)."""
    builder = _builder()
    if name in builder.KUBERNETES:
        return Path(builder.CACHE) / "kubernetes" / kubernetes_version / name
    if name in builder.CONTAINERD:
        # containerd's own version, whatever the Kubernetes one.
        return Path(builder.CACHE) / "containerd" / builder.CONTAINERD_VERSION / name
    etcd = RELEASES[minor_of(kubernetes_version)].etcd_version
    return Path(builder.CACHE) / "etcd" / etcd / name


def build_command(name: str, kubernetes_version: str = DEFAULT_KUBERNETES) -> str:
    builder = _builder()
    if name in builder.CONTAINERD:
        return f"tests/real/build-binaries {name}@{builder.CONTAINERD_VERSION}"
    return f"tests/real/build-binaries {name}@{kubernetes_version}"


def binary(name: str, kubernetes_version: str = DEFAULT_KUBERNETES) -> str:
    """The absolute path of a built binary; skip (fail under CI=true) when it has not been built."""
    path = cached_path(name, kubernetes_version)
    if not path.is_file():
        command = build_command(name, kubernetes_version)
        builder = _builder()
        which = builder.CONTAINERD_VERSION if name in builder.CONTAINERD else f"for Kubernetes {kubernetes_version}"
        unavailable(f"{name} {which} is not built: run {command}")
    return str(path)


def reported_version(path: str) -> str:
    """What a Kubernetes binary says its version is (`--version` / `version -o short`)."""
    argv = [path, "version", "-o", "short"] if path.endswith("/kubeadm") else [path, "--version"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return (result.stdout + result.stderr).strip()


# What the suite runs (tests/run-all.sh builds these before pytest): kubeadm at both validated versions, and
# the default release's control plane, kubectl (the program's scripts call it) and the etcd kubeadm pins.
SUITE = (
    *(f"kubeadm@{version}" for version in KUBEADM_VERSIONS),
    *(
        f"{name}@{DEFAULT_KUBERNETES}"
        for name in (
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
            "etcd",
            "etcdctl",
            "etcdutl",
        )
    ),
    # The containerd Ubuntu ships (its own version), to load the config node preparation writes; with its ctr and
    # runc shim, to run the etcd tools in an etcd image the way the nodes do.
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    # The pause binary (gcc, from pause.c in the k8s.io/kubernetes module; under a second): test_oci_images.py
    # imports an OCI archive of registry.k8s.io/pause into that containerd.
    "pause",
    # The rest of a small real bundle (tests/real/test_bundle_install_live.py installs it with the node's bundle step):
    # runc (CGO, static), crictl and the four CNI plugins flannel's config chains, each a short Go build; and
    # distribution's registry, the site's mirror of tests/real/test_registry_mirror_live.py (about 2 minutes cold).
    "runc",
    "crictl",
    "bridge",
    "host-local",
    "loopback",
    "portmap",
    "registry",
    # The real Pulumi engine (tests/real/engine/toolchain.py): the dev preview and the bad-config refusal run in
    # the suite. The language host first: the CLI of the same release reuses its compiled packages.
    "pulumi-language-python",
    "pulumi",
    "pulumi-resource-command",
    "pulumi-resource-tls",
    "pulumi-resource-libvirt",
)


def main() -> int:
    """Build (or find in the cache) every binary of SUITE, one `build-binaries` run each, so the log shows each time."""
    for spec in SUITE:
        result = subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), spec], check=False, stdout=subprocess.PIPE, text=True
        )
        if result.returncode != 0:
            print(f"tests/real: building {spec} failed (exit {result.returncode})", file=sys.stderr)
            return result.returncode
        print(result.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
