"""The node binaries a real-cluster lab needs beyond the suite's (issue 21): the container runtime's runc, the CNI
plugins flannel's network config chains, flanneld, crictl, CoreDNS, the pause binary, and distribution's registry
(the site's mirror in the mirror-mode test); built by `tests/real/build-binaries NAME[@VERSION]` like its other
groups, cached under $KUBEADM_HA_BIN_CACHE/GROUP/VERSION/NAME, from the Go module proxy (pause: gcc, from C source in
the k8s.io/kubernetes module). Test-only, as the rest of tests/real: the program itself never builds anything.

Which module versions the proxy serves here, and the workarounds, were checked with `go mod download -json
MODULE@VERSION` (no "Error"); shared/lab-binaries.md keeps the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Group:
    """Binaries built from one upstream Go module at one version, cached in CACHE/directory/VERSION/."""

    directory: str
    version: str  # the default; every pin says where it comes from
    module: str
    packages: dict[str, str]  # NAME -> package directory inside the module ("" for the module root)
    cgo: bool = False
    tags: str = ""
    ldflags: str = "-s -w"  # {version} is the version built
    replaces: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


# What the plugins' build_linux.sh sets: `bridge --version` says the release.
CNI_LDFLAGS = "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=v{version}"
TENCENT_VPC = "github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc"
GROUPS = (
    # runc v1.3.6: the runc containerd 2.2.9 (build-binaries CONTAINERD_VERSION) is released and tested with
    # (script/setup/runc-version in the github.com/containerd/containerd/v2 v2.2.9 module); the proxy serves it
    # (`go mod download -json github.com/opencontainers/runc@v1.3.6`). Its nsenter is C, so CGO is on. Built as
    # the Makefile's `static` target does (seccomp netgo osusergo, linked with -static: libseccomp.a from Debian's
    # libseccomp-dev, which the build needs). With seccomp: kubeadm's static Pods ask for the RuntimeDefault
    # profile, and a runc without it refuses them ("unable to init seccomp: seccomp: config provided but seccomp not
    # supported", measured by tests/real/cluster-lab). Cached under runc-seccomp/, apart from the earlier build.
    Group(
        "runc-seccomp",
        "1.3.6",
        "github.com/opencontainers/runc",
        {"runc": ""},
        cgo=True,
        tags="urfave_cli_no_docs seccomp netgo osusergo",
        ldflags="-s -w -X main.version={version} -linkmode external -extldflags -static",
    ),
    # The CNI plugins flannel's network config chains (Documentation/kube-flannel.yml of flannel v0.28.10: `flannel`
    # delegating to `bridge` with `host-local` IPAM, then `portmap`) and `loopback`, which containerd's CRI runs for
    # every pod's lo. v1.8.0: the version shared/lab-binaries.md found served (`go mod download -json`).
    Group(
        "cni-plugins",
        "1.8.0",
        "github.com/containernetworking/plugins",
        {
            "bridge": "plugins/main/bridge",
            "host-local": "plugins/ipam/host-local",
            "loopback": "plugins/main/loopback",
            "portmap": "plugins/meta/portmap",
        },
        ldflags=CNI_LDFLAGS,
    ),
    # The flannel CNI plugin. The manifest's image (ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3) is built
    # from github.com/flannel-io/cni-plugin, which the proxy refuses at every version tried (v1.2.0 ...
    # v1.9.1-flannel3); plugins/meta/flannel of github.com/containernetworking/plugins v0.9.1 is the code it grew
    # from, and is served (shared/lab-binaries.md). Built against github.com/containernetworking/cni v1.3.0 (the
    # library flannel-io/cni-plugin v1.9.1 uses; the plugin's code compiles unchanged): with v0.9.1's own cni v0.8.1
    # it speaks CNI 0.1.0-0.4.0 only, and kube-flannel.yml's cni-conf.json says cniVersion 1.0.0, so every pod
    # sandbox failed ("incompatible CNI versions; config is \"1.0.0\", plugin supports [... \"0.4.0\"]", measured by
    # tests/real/cluster-lab). Cached under flannel-cni-cni1/, apart from the earlier build.
    Group(
        "flannel-cni-cni1",
        "0.9.1",
        "github.com/containernetworking/plugins",
        {"flannel": "plugins/meta/flannel"},
        ldflags=CNI_LDFLAGS,
        replaces=("github.com/containernetworking/cni => github.com/containernetworking/cni v1.3.0",),
    ),
    # flanneld v0.28.10 (the flannel release whose kube-flannel.yml the lab applies) and its install-conf, which the
    # manifest's install-cni init container runs. The pinned tencentcloud vpc module's zip (v1.3.188) is refused by
    # the proxy, v1.1.0 is served and builds; the udp backend is C, so CGO is on (shared/lab-binaries.md). Linked
    # statically as upstream's Makefile does (-extldflags -static; netgo osusergo keep glibc's NSS out).
    Group(
        "flannel",
        "0.28.10",
        "github.com/flannel-io/flannel",
        {"flanneld": "", "install-conf": "cmd/install_conf"},
        cgo=True,
        tags="netgo osusergo",
        ldflags="-s -w -X github.com/flannel-io/flannel/pkg/version.Version=v{version} -extldflags -static",
        replaces=(f"{TENCENT_VPC} => {TENCENT_VPC} v1.1.0",),
    ),
    # crictl v1.34.0: served by the proxy (shared/lab-binaries.md); the cri-tools release of the Kubernetes 1.34
    # cycle, the newest the proxy gives; crictl talks the stable CRI v1 API, which containerd 2.2 serves.
    Group(
        "cri-tools",
        "1.34.0",
        "sigs.k8s.io/cri-tools",
        {"crictl": "cmd/crictl"},
        ldflags="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=v{version}",
    ),
    # CoreDNS v1.14.6: the version kubeadm 1.37.2 deploys (`kubeadm config images list --kubernetes-version v1.37.2`
    # names registry.k8s.io/coredns/coredns:v1.14.6); built CGO off, as upstream's Makefile does.
    Group(
        "coredns",
        "1.14.6",
        "github.com/coredns/coredns",
        {"coredns": ""},
        ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=v{version}",
    ),
    # distribution's registry v3.0.0 (cmd/registry): a real OCI registry as the site's mirror in the mirror-mode test
    # (tests/real/test_registry_mirror_live.py). Served by the proxy (shared/lab-binaries.md); version as upstream's
    # Makefile sets it (version.version), CGO off.
    Group(
        "distribution",
        "3.0.0",
        "github.com/distribution/distribution/v3",
        {"registry": "cmd/registry"},
        ldflags="-s -w -X github.com/distribution/distribution/v3/version.version=v{version}",
    ),
)
GO_NAMES = {name: group for group in GROUPS for name in group.packages}

# pause 3.10.2: kubeadm 1.37.2's PauseVersion (cmd/kubeadm/app/constants/constants.go), and the TAG of
# build/pause/Makefile in the k8s.io/kubernetes v1.37.2 module, whose build/pause/linux/pause.c is compiled here with
# the Makefile's CFLAGS (-Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV)). REV is `git describe --contains` of the
# release tree, which a module zip lacks: the Kubernetes tag stands in for it.
PAUSE_VERSION = "3.10.2"
PAUSE_SOURCE = {"3.10.2": "1.37.2"}  # pause version -> the Kubernetes release whose build/pause/Makefile has that TAG
NAMES = (*GO_NAMES, "pause")


def log(message: str) -> None:
    print(f"build-binaries: {message}", file=sys.stderr, flush=True)


def default_version(name: str) -> str:
    return PAUSE_VERSION if name == "pause" else GO_NAMES[name].version


def group_dir(name: str, version: str, cache: Path) -> Path:
    return cache / ("pause" if name == "pause" else GO_NAMES[name].directory) / version


def cached_path(name: str, version: str, cache: Path) -> Path:
    return group_dir(name, version, cache) / name


def lock_name(name: str, version: str) -> str:
    """One lock per throwaway module: the names of a group share it."""
    return f"{'pause' if name == 'pause' else GO_NAMES[name].directory}-{version}"


def _go(args: list[str], cwd: Path, cgo: bool) -> None:
    env = {**os.environ, "CGO_ENABLED": "1" if cgo else "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    result = subprocess.run(["go", *args], cwd=cwd, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        raise SystemExit(f"build-binaries: go {' '.join(args)} failed in {cwd} (exit {result.returncode})")


def module_dir(module: str, version: str, work: Path) -> Path:
    """The module's unpacked source in the module cache; a refused version fails with the proxy's own words."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@v{version}"],
        cwd=work, capture_output=True, text=True, check=False, env={**os.environ, "GOFLAGS": "-mod=mod"},
    )  # fmt: skip
    error = re.search(r'"Error":\s*"((?:[^"\\]|\\.)*)"', result.stdout)
    directory = re.search(r'"Dir":\s*"([^"]+)"', result.stdout)
    if error or not directory:
        reason = error[1] if error else result.stderr.strip()
        raise SystemExit(f"build-binaries: {module}@v{version} is not served: {reason}")
    return Path(directory[1])


def _throwaway(work: Path, group: Group, version: str) -> None:
    """A module that requires the upstream one (whose own replace directives `go install` would refuse)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "go.mod").is_file():
        (work / "go.mod").write_text("module kubeadmha.test/build\n\ngo 1.22\n")
    source = module_dir(group.module, version, work)
    go_version = re.search(r"^go (\S+)", (source / "go.mod").read_text(), re.M)
    lines = ["module kubeadmha.test/build", "", f"go {go_version[1] if go_version else '1.22'}", ""]
    lines += [f"require {group.module} v{version}"]
    if group.replaces:
        lines += ["", "replace (", *(f"\t{replace}" for replace in group.replaces), ")"]
    (work / "go.mod").write_text("\n".join(lines) + "\n")


def _build_go(name: str, version: str, cache: Path) -> Path:
    group = GO_NAMES[name]
    out = cached_path(name, version, cache)
    work = cache / "work" / f"{group.directory}-{version}"
    _throwaway(work, group, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{name}.partial")
    package = f"{group.module}/{group.packages[name]}".rstrip("/")
    args = ["build", "-trimpath", "-ldflags", group.ldflags.format(version=version), "-o", str(partial)]
    if group.tags:
        args += ["-tags", group.tags]
    _go([*args, package], work, group.cgo)
    partial.rename(out)  # last: its presence means a complete binary
    return out


def _build_pause(version: str, cache: Path) -> Path:
    if version not in PAUSE_SOURCE:
        raise SystemExit(f"build-binaries: pause {version}: no Kubernetes release known to carry it ({PAUSE_SOURCE})")
    kubernetes = PAUSE_SOURCE[version]
    work = cache / "work" / f"pause-{version}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "go.mod").is_file():
        (work / "go.mod").write_text("module kubeadmha.test/build\n\ngo 1.22\n")
    source = module_dir("k8s.io/kubernetes", kubernetes, work) / "build" / "pause"
    tag = re.search(r"^TAG \?= (\S+)", (source / "Makefile").read_text(), re.M)
    if not tag or tag[1] != version:
        raise SystemExit(f"build-binaries: build/pause/Makefile of Kubernetes {kubernetes} has TAG {tag and tag[1]}")
    out = cached_path("pause", version, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name("pause.partial")
    argv = ["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{version}-v{kubernetes}"]
    result = subprocess.run(
        [*argv, "-o", str(partial), str(source / "linux" / "pause.c")],
        stdout=sys.stderr,
        stderr=sys.stderr,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"build-binaries: gcc of pause.c failed (exit {result.returncode})")
    subprocess.run(["strip", str(partial)], check=True)
    partial.rename(out)
    return out


def build(name: str, version: str, cache: Path) -> Path:
    """The cached binary, built first when missing; the caller holds lock_name's lock."""
    out = cached_path(name, version, cache)
    if out.is_file():
        return out
    started = time.monotonic()
    path = _build_pause(version, cache) if name == "pause" else _build_go(name, version, cache)
    log(f"built {name} v{version} in {time.monotonic() - started:.0f} s")
    return path
