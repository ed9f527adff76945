"""Installing a node from an artifact bundle (model/bundle.py) instead of apt and the registries.

The program copies the bundle into the SSH user's home (`STAGE_DIR`, pulumi-command's CopyToRemote over the
pinned connection); this step, as root, copies it into a root-only directory, verifies the copy there (the
manifest against the stack's pin, every file the node needs against the manifest), and only then installs:
binaries where the Debian packages put them, the CNI plugins, the systemd units the packages would have
brought, and the images imported into containerd's `k8s.io` namespace, so that kubeadm pulls nothing. The
verified copy stays (`bundle_dir`): a re-run, and the CNI step, read it there; the staged copy is removed.

Guarded by a marker holding the manifest's sha256: a second `pulumi up` does nothing. Every failure names the
host, the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.bundle import BINARIES, CNI_PLUGIN_DIR, KUBERNETES_BINARIES, MANIFEST, Entry, Manifest, kubeadm_images
from render.artifact_units import CONTAINERD_SERVICE, KUBEADM_DROP_IN, KUBELET_SERVICE, UNIT_DIR
from render.scripts import STATE_DIR, Script, bounded_wait_function, command, logged, quote, write_file

STEP = "bundle"
# Relative to the SSH user's home: where CopyToRemote puts the bundle (sftp resolves a relative path there).
STAGE_DIR = "kubeadm-ha-bundle"
BUNDLES_DIR = f"{STATE_DIR}/bundle"
INSTALLED_MARKER = f"{BUNDLES_DIR}/installed"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
# What the node image must carry: kubeadm's mandatory preflight executables (cmd/kubeadm/app/preflight/
# checks_linux.go at v1.37.2: losetup, mount, cp; conntrack only before 1.32), what this step uses, and curl,
# which the program's later steps use for health checks.
OS_TOOLS = ("losetup", "mount", "cp", "tar", "sha256sum", "modprobe", "getent", "cmp", "curl")
# How each installed Kubernetes binary says its version (also the upgrade step's guard, render/lifecycle.py).
VERSION_PROBES = {
    "kubeadm": "kubeadm version -o short",
    "kubelet": "kubelet --version",
    "kubectl": "kubectl version --client",
}
_CONTROL_PLANE_ONLY_IMAGES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")

_MISSING = "${path##*/.incoming/}: missing from the copied bundle (its manifest lists it)"
_WRONG = (
    "${path##*/.incoming/}: wrong digest (sha256 $got, the manifest pins $want): the file is damaged or was replaced"
)
_AGAIN = "check the bundle with python -m tools.bundle check, then run pulumi up again"
_NO_TOOL = "$tool is not installed: it comes with the operating system, not the bundle; use a node image that has it"
_NOT_STAGED = "the bundle copied by pulumi up is not at $stage: run pulumi up again (it copies it)"
_FUNCTIONS = (
    "kha_bundle_fail() {",
    '  echo "kubeadm-ha: bundle on ${KUBEADM_HA_HOST}: $*" >&2',
    "  exit 1",
    "}",
    "kha_bundle_check() {",
    '  local path="$1" want="$2" got',
    f'  [ -f "$path" ] || kha_bundle_fail "{_MISSING}: {_AGAIN}"',
    '  got="$(sha256sum <"$path" | cut -c1-64)"',
    f'  [ "$got" = "$want" ] || kha_bundle_fail "{_WRONG}; {_AGAIN}"',
    "}",
    # `kha_bundle_prints -x|-w TEXT CMD...`: CMD succeeds and prints TEXT as a line (-x) or a word (-w). Its whole
    # output is read first: `CMD | grep -q` under pipefail fails when grep has seen enough and CMD, still writing,
    # dies of SIGPIPE (kubectl's version, ctr's image list).
    "kha_bundle_prints() {",
    '  local match="$1" text="$2" out',
    "  shift 2",
    '  out="$("$@")" || return 1',
    '  grep -q "$match" -F -- "$text" <<<"$out"',
    "}",
    *bounded_wait_function(1),
)


@dataclass(frozen=True)
class BundleInstall:
    """What one node installs from the bundle pinned by `sha256`."""

    manifest: Manifest
    sha256: str
    staged_name: str  # the bundle's file or directory name inside STAGE_DIR/<sha256>/
    archive: bool  # a .tar (extracted) rather than a directory (copied)
    role: str  # cp, worker or etcd
    external_etcd: bool = False

    @property
    def directory(self) -> str:
        return bundle_dir(self.sha256)

    def binaries(self) -> tuple[Entry, ...]:
        wanted = set(BINARIES) - {"etcdctl"}
        if self.role == "etcd":
            wanted = {"containerd", "containerd-shim-runc-v2", "ctr", "runc", "crictl", "kubelet", "etcdctl"}
        return tuple(entry for entry in self.manifest.of_kind("binary") if entry.name in wanted)

    def plugins(self) -> tuple[Entry, ...]:
        return () if self.role == "etcd" else self.manifest.of_kind("cni-plugin")

    def images(self) -> tuple[Entry, ...]:
        """The node's images: an etcd member's etcd and pause; a worker's all but the control plane's."""
        images = self.manifest.of_kind("image")
        kubeadm = set(kubeadm_images(self.manifest.kubernetes_version))
        if self.role == "etcd":
            return tuple(
                entry for entry in images if entry.name in kubeadm and _repository(entry.name) in ("etcd", "pause")
            )
        if self.role == "worker":
            return tuple(entry for entry in images if _repository(entry.name) not in _CONTROL_PLANE_ONLY_IMAGES)
        return images

    def needed(self) -> tuple[Entry, ...]:
        cni = () if self.role == "etcd" else self.manifest.of_kind("cni-manifest")
        return (*self.binaries(), *self.plugins(), *self.images(), *cni)


def bundle_dir(sha256: str) -> str:
    return f"{BUNDLES_DIR}/{sha256}"


def _repository(reference: str) -> str:
    return reference.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]


def bundle_install_script(hostname: str, bundle: BundleInstall) -> Script:
    sha = bundle.sha256
    final = bundle.directory
    incoming = f"{BUNDLES_DIR}/.incoming"
    staged = f'"$stage"/{quote(bundle.staged_name)}'
    fetch = (
        f"tar -x -f {staged} -C {quote(incoming)} --no-same-owner --no-same-permissions"
        if bundle.archive
        else f"cp -R {staged}/. {quote(incoming)}/"
    )
    # Only hex digits and plain words inside the double quotes: nothing there for the shell to expand but $got.
    pinned = (
        f'"manifest.json: sha256 ${{got:-(none)}}, the stack pins {sha} (artifacts.bundle.sha256): this is another'
        ' bundle; check it with python -m tools.bundle check, then run pulumi up again"'
    )
    body: list[str] = [
        "umask 022",
        "# What the bundle does not carry: the node image's own tools.",
        f"for tool in {' '.join(quote(tool) for tool in OS_TOOLS)}; do",
        f'  command -v "$tool" >/dev/null 2>&1 || kha_bundle_fail "{_NO_TOOL}"',
        "done",
        f'if [ "$(cat {quote(final + "/.verified")} 2>/dev/null)" != {quote(sha)} ]; then',
        '  stage="$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"/' + quote(f"{STAGE_DIR}/{sha}"),
        f'  [ -e {staged} ] || kha_bundle_fail "{_NOT_STAGED}"',
        f"  rm -rf {quote(incoming)}",
        f"  install -d -m 0700 {quote(BUNDLES_DIR)} {quote(incoming)}",
        f"  {fetch}",
        f'  got="$(sha256sum <{quote(incoming + "/" + MANIFEST)} 2>/dev/null | cut -c1-64)" || true',
        f'  [ "$got" = {quote(sha)} ] || kha_bundle_fail {pinned}',
        *(f"  kha_bundle_check {quote(incoming + '/' + entry.path)} {entry.sha256}" for entry in bundle.needed()),
        f"  printf '%s\\n' {quote(sha)} >{quote(incoming + '/.verified')}",
        f"  rm -rf {quote(final)}",
        f"  mv {quote(incoming)} {quote(final)}",
        '  rm -rf "$stage"',
        "fi",
        "# Binaries where the packages would put them; a changed containerd is restarted below.",
        'containerd_changed=""',
    ]
    version = f"v{bundle.manifest.kubernetes_version}"
    for entry in bundle.binaries():
        source, target = f"{final}/{entry.path}", BINARIES[entry.name]
        flag = " && containerd_changed=1" if entry.name.startswith("containerd") else ""
        install = command("install", "-D", "-m", "0755", source, target)
        line = f"cmp -s {quote(source)} {quote(target)} || {{ {install}{flag}; }}"
        if entry.name not in KUBERNETES_BINARIES:
            body.append(line)
            continue
        # A running node's kubeadm, kubelet and kubectl of another version are the upgrade steps' to replace, in
        # kubeadm's order (render/lifecycle.py); anything installed here must then report the stack's version.
        probe = VERSION_PROBES[entry.name].replace(entry.name, target, 1)
        wrong = f"{entry.path} is not {entry.name} {version}: assemble the bundle for the stack's version"
        body += [
            f"if [ -e {quote(target)} ] && ! kha_bundle_prints -w {quote(version)} {probe} 2>/dev/null; then",
            f"  echo {quote(f'kubeadm-ha: {target} is another version than {version}: the upgrade step replaces it')}",
            "else",
            f"  {line}",
            f"  kha_bundle_prints -w {quote(version)} {probe} 2>/dev/null || kha_bundle_fail {quote(wrong)}",
            "fi",
        ]
    for entry in bundle.plugins():
        body.append(command("install", "-D", "-m", "0755", f"{final}/{entry.path}", f"{CNI_PLUGIN_DIR}/{entry.name}"))
    body += [
        "# The units the containerd and kubelet packages would have installed.",
        *write_file(f"{UNIT_DIR}/containerd.service", CONTAINERD_SERVICE),
        *write_file(f"{UNIT_DIR}/kubelet.service", KUBELET_SERVICE),
        *(
            write_file(f"{UNIT_DIR}/kubelet.service.d/10-kubeadm.conf", KUBEADM_DROP_IN)
            if bundle.role != "etcd"
            else ()
        ),
        command("systemctl", "daemon-reload"),
        command("systemctl", "enable", "containerd", "kubelet"),
        'if [ -n "$containerd_changed" ] || ! systemctl is-active --quiet containerd; then',
        "  " + command("systemctl", "restart", "containerd"),
        "fi",
        f'kha_wait 60 "containerd\'s socket" test -S {quote(CONTAINERD_SOCKET)}',
        "# Images into containerd's k8s.io namespace (the CRI's), so kubeadm and kubelet pull nothing.",
    ]
    ctr = ("ctr", "--address", CONTAINERD_SOCKET, "--namespace", "k8s.io")
    for entry in bundle.images():
        archive = f"{final}/{entry.path}"
        missing = f"{entry.path}: imported, but containerd has no image {entry.name}: the archive names another image"
        listed = command("kha_bundle_prints", "-x", entry.name, *ctr, "images", "ls", "--quiet")
        body += [
            logged(STEP, *ctr, "images", "import", "--platform", "linux/amd64", archive),
            f"{listed} || kha_bundle_fail {quote(missing)}",
        ]
    body += [
        f"printf '%s\\n' {quote(sha)} >{quote(INSTALLED_MARKER)}",
        "# Bundles this node installed before (an upgrade's previous one) are no longer needed: ~0.5 GiB each.",
        f"find {quote(BUNDLES_DIR)} -mindepth 1 -maxdepth 1 -type d ! -name {quote(sha)} -exec rm -rf {{}} +",
    ]
    return Script(
        step=STEP,
        host=hostname,
        done_when=f'[ "$(cat {quote(INSTALLED_MARKER)} 2>/dev/null)" = {quote(sha)} ]',
        body=tuple(body),
        functions=_FUNCTIONS,
    )
