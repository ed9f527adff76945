"""First-boot preparation of a node, one script per role, run by cloud-init's `runcmd`.

Every script is idempotent twice over: its guard (`PREPARED_MARKER` holding the
expected content) makes a completed run a no-op, and every action is itself
safe to repeat, so a run interrupted anywhere can simply be run again.

The scripts only write public files, so they switch to umask 022 (the renderer
starts every script with 077): packages' maintainer scripts inherit the umask,
and apt must be able to read the repository keyring as the `_apt` user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from model.versions import kubernetes_apt_version, release_for
from render import yamldoc
from render.kubeadm import CRI_SOCKET, KUBELET_API
from render.scripts import Script, command, download_signing_key, https_fetch, logged, quote, write_file

if TYPE_CHECKING:
    from model.config import KubernetesConfig
    from model.offsets import Role

STEP = "node-prep"
LOG_NAME = "node-prep"
PREPARED_MARKER = "/var/lib/kubeadm-ha/prepared"

KUBERNETES_PACKAGES = ("kubelet", "kubeadm", "kubectl")
# An etcd member runs etcd as a static pod: kubelet alone, no kubeadm join, no kubectl.
ETCD_NODE_KUBERNETES_PACKAGES = ("kubelet",)
STATIC_POD_DIR = "/etc/kubernetes/manifests"
ETCD_KUBELET_CONFIG_FILE = "/etc/kubernetes/kubelet-standalone.yaml"
ETCD_KUBELET_DROP_IN = "/etc/systemd/system/kubelet.service.d/20-etcd-service-manager.conf"
KUBERNETES_KEYRING = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg"
# The pkgs.k8s.io signing key (OBS project isv:kubernetes), the same for every minor's repository:
# `gpg --show-keys` of https://pkgs.k8s.io/core:/stable:/v1.3x/deb/Release.key, as published in the
# kubernetes/website discussion of pinning it (issue 42718) and used by kubespray, puppetlabs-kubernetes
# and others. Pinned by fingerprint: re-exports with a later expiry keep it.
KUBERNETES_KEY_FINGERPRINT = "DE15B14486CD377B9E876E1A234654DA9A296436"
KUBERNETES_SOURCES = "/etc/apt/sources.list.d/kubernetes.list"
_DOWNLOADED_KEY = "/var/lib/kubeadm-ha/kubernetes-release.key"

MODULES_FILE = "/etc/modules-load.d/kubeadm-ha.conf"
KERNEL_MODULES = ("overlay", "br_netfilter")
SYSCTL_FILE = "/etc/sysctl.d/99-kubeadm-ha.conf"
KUBERNETES_SYSCTLS = (
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("net.ipv4.ip_forward", "1"),
)
# keepalived's VIP is not local on the backup; haproxy must still bind to it.
LOAD_BALANCER_SYSCTLS = (("net.ipv4.ip_nonlocal_bind", "1"),)

CONTAINERD_CONFIG_FILE = "/etc/containerd/config.toml"
# A complete file, not a sed edit of `containerd config default`: that dump is a different layout per
# major version (1.7: `version = 2`, runc options under "io.containerd.grpc.v1.cri"; 2.x: `version = 3`,
# under "io.containerd.cri.v1.runtime"), so a sed written for one silently matches nothing on the other,
# and a full dump freezes every default of the installed version into the file. Config version 2 is read
# natively by containerd 1.7 and migrated in memory by 2.x (its CRI runtime plugin's ConfigMigration maps
# the old section to the new one); everything not named here keeps the running version's default.
CONTAINERD_CONFIG = """\
# Written by kubeadm-ha. Config version 2: read by containerd 1.7, migrated on load by containerd 2.x.
version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""
CRICTL_CONFIG_FILE = "/etc/crictl.yaml"
CRICTL_CONFIG = """\
runtime-endpoint: unix:///run/containerd/containerd.sock
image-endpoint: unix:///run/containerd/containerd.sock
"""

# apt-get (with DEBIAN_FRONTEND=noninteractive exported) that waits for a first-boot apt-daily or
# unattended-upgrades run instead of failing on the dpkg lock, and keeps our config files if a package
# ships its own.
APT_GET = (
    "apt-get",
    "-o",
    "DPkg::Lock::Timeout=600",
    "-o",
    "Acquire::Retries=5",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
    "--yes",
    "--quiet",
)
CURL = https_fetch(60)


def kubernetes_repository(kubernetes: KubernetesConfig) -> str:
    return f"https://pkgs.k8s.io/core:/stable:/v{kubernetes.minor}/deb/"


def marker_guard(content: str) -> str:
    """True when the marker exists and holds exactly `content` (a different version means: prepare again)."""
    return f'[ -f {quote(PREPARED_MARKER)} ] && [ "$(cat {quote(PREPARED_MARKER)})" = {quote(content)} ]'


def kubernetes_marker(kubernetes: KubernetesConfig) -> str:
    return f"kubernetes-node {kubernetes_apt_version(kubernetes.version)}"


LOAD_BALANCER_MARKER = "load-balancer haproxy keepalived"


def _swap_off() -> tuple[str, ...]:
    return (
        "# Swap off now and at boot (kubelet refuses to start with swap on by default).",
        command("swapoff", "-a"),
        f"if [ -f {quote('/etc/fstab')} ]; then",
        "  " + _COMMENT_OUT_SWAP,
        "fi",
    )


def _containerd(*extra_packages: str) -> tuple[str, ...]:
    return (
        "# containerd from Ubuntu's archive, with the systemd cgroup driver kubelet expects.",
        logged(LOG_NAME, *APT_GET, "update"),
        logged(
            LOG_NAME,
            *APT_GET,
            "install",
            "--no-install-recommends",
            "containerd",
            "ca-certificates",
            "curl",
            "gpg",
            *extra_packages,
        ),
        *write_file(CONTAINERD_CONFIG_FILE, CONTAINERD_CONFIG),
        *write_file(CRICTL_CONFIG_FILE, CRICTL_CONFIG),
        command("systemctl", "enable", "containerd"),
        command("systemctl", "restart", "containerd"),
    )


def use_kubernetes_repository(kubernetes: KubernetesConfig) -> tuple[str, ...]:
    """Point apt at the minor's pkgs.k8s.io repository (each minor has its own; an upgrade moves to the next),
    trusting only the signing key with the pinned fingerprint. Run under umask 022: apt reads the keyring as
    the `_apt` user."""
    repository = kubernetes_repository(kubernetes)
    return (
        command("install", "-d", "-m", "0755", "/etc/apt/keyrings"),
        *download_signing_key(CURL, repository + "Release.key", _DOWNLOADED_KEY, KUBERNETES_KEY_FINGERPRINT),
        command("gpg", "--batch", "--yes", "--dearmor", "--output", KUBERNETES_KEYRING + ".tmp", _DOWNLOADED_KEY),
        command("chmod", "0644", KUBERNETES_KEYRING + ".tmp"),
        command("mv", "-f", KUBERNETES_KEYRING + ".tmp", KUBERNETES_KEYRING),
        *write_file(KUBERNETES_SOURCES, f"deb [signed-by={KUBERNETES_KEYRING}] {repository} /\n"),
    )


def _pinned_kubernetes_packages(kubernetes: KubernetesConfig, packages: tuple[str, ...]) -> tuple[str, ...]:
    apt_version = kubernetes_apt_version(kubernetes.version)
    return (
        f"# {_spoken_list(packages)} {kubernetes.version} from the v{kubernetes.minor} repository, held there.",
        *use_kubernetes_repository(kubernetes),
        logged(LOG_NAME, *APT_GET, "update"),
        # --allow-change-held-packages: a re-run finds the packages already held.
        logged(
            LOG_NAME,
            *APT_GET,
            "install",
            "--no-install-recommends",
            "--allow-change-held-packages",
            *(f"{package}={apt_version}" for package in packages),
        ),
        logged(LOG_NAME, "apt-mark", "hold", *packages),
    )


# With an artifact bundle (model/artifacts.py) the first boot installs nothing: the bundle step
# (render/artifacts.py) installs containerd and Kubernetes once the program has copied the bundle over SSH.
BUNDLE_MARKER_SUFFIX = " (software from the artifact bundle)"


def bundle_containerd_config(pause_tag: str) -> str:
    """CONTAINERD_CONFIG with the CRI's sandbox image set to kubeadm's pause image.

    Without it containerd runs every pod sandbox from its own default (containerd 2.2.9: registry.k8s.io/pause:
    3.10.1, internal/cri/config/config.go `DefaultSandboxImage`), which a bundle does not carry (it carries the
    one kubeadm names), so no pod could start without a registry. Config version 2's `sandbox_image`: containerd
    1.7 reads it, 2.x migrates it to the images plugin's `pinned_images.sandbox` (plugins/cri/images/plugin.go).
    """
    section = f'[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "registry.k8s.io/pause:{pause_tag}"\n\n'
    head, _, rest = CONTAINERD_CONFIG.partition("\n\n")
    return f"{head}\n\n{section}{rest}"


def _containerd_configuration(kubernetes: KubernetesConfig) -> tuple[str, ...]:
    return (
        "# containerd's configuration, for the containerd the artifact bundle installs.",
        *write_file(CONTAINERD_CONFIG_FILE, bundle_containerd_config(release_for(kubernetes.version).pause_tag)),
        *write_file(CRICTL_CONFIG_FILE, CRICTL_CONFIG),
    )


def _kernel_for_pods() -> tuple[str, ...]:
    return (
        "# Kernel modules and sysctls for the pod network, now and at every boot.",
        *write_file(MODULES_FILE, "".join(f"{module}\n" for module in KERNEL_MODULES)),
        *(command("modprobe", module) for module in KERNEL_MODULES),
        *write_file(SYSCTL_FILE, _sysctl_file(KUBERNETES_SYSCTLS)),
        logged(LOG_NAME, "sysctl", "-p", SYSCTL_FILE),
    )


def kubernetes_node_preparation(hostname: str, kubernetes: KubernetesConfig, *, from_bundle: bool = False) -> Script:
    """Control-plane and worker nodes: kernel settings, containerd, and the pinned kubelet/kubeadm/kubectl."""
    _check_hostname(hostname)
    marker = kubernetes_marker(kubernetes)
    if from_bundle:
        marker += BUNDLE_MARKER_SUFFIX
        body_of_bundle = ("umask 022", *_swap_off(), *_kernel_for_pods(), *_containerd_configuration(kubernetes))
        body_of_bundle += write_file(PREPARED_MARKER, marker + "\n")
        return Script(step=STEP, host=hostname, done_when=marker_guard(marker), body=body_of_bundle)
    body = (
        "umask 022",
        "export DEBIAN_FRONTEND=noninteractive",
        *_swap_off(),
        *_kernel_for_pods(),
        *_containerd(),
        *_pinned_kubernetes_packages(kubernetes, KUBERNETES_PACKAGES),
        # kubeadm starts kubelet once it has written kubelet's configuration.
        command("systemctl", "enable", "kubelet"),
        *write_file(PREPARED_MARKER, marker + "\n"),
    )
    return Script(step=STEP, host=hostname, done_when=marker_guard(marker), body=body)


def etcd_marker(kubernetes: KubernetesConfig) -> str:
    return f"etcd-node {kubernetes_apt_version(kubernetes.version)}"


def standalone_kubelet_configuration() -> dict[str, Any]:
    """kubelet without an API server, only running the static pods in STATIC_POD_DIR (kubeadm's external etcd guide).

    Nobody can authenticate (no client CA, no webhook, no anonymous access), and it listens on loopback only,
    so `AlwaysAllow` authorises nothing reachable.
    """
    return {
        "apiVersion": KUBELET_API,
        "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "address": "127.0.0.1",
        "cgroupDriver": "systemd",
        "containerRuntimeEndpoint": CRI_SOCKET,
        "staticPodPath": STATIC_POD_DIR,
        "failSwapOn": True,
    }


def standalone_kubelet_drop_in() -> str:
    # A systemd unit file (INI), not YAML: the empty ExecStart= clears the packaged command before replacing it.
    return (
        "# Written by kubeadm-ha: kubelet runs only this node's static pods (etcd), with no API server.\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart=/usr/bin/kubelet --config={ETCD_KUBELET_CONFIG_FILE}\n"
        "Restart=always\n"
    )


def etcd_node_preparation(hostname: str, kubernetes: KubernetesConfig, *, from_bundle: bool = False) -> Script:
    """External etcd members: containerd, a pinned standalone kubelet for the etcd static pod, and etcdctl.

    From a bundle, only the files: the bundle step installs containerd, kubelet and etcdctl and starts them."""
    _check_hostname(hostname)
    marker = etcd_marker(kubernetes) + (BUNDLE_MARKER_SUFFIX if from_bundle else "")
    kubelet_config = yamldoc.dump(standalone_kubelet_configuration())
    software = (
        # Ubuntu's etcdctl (3.4) speaks the v3 API of every etcd kubeadm ships; it serves health and membership.
        *_containerd("etcd-client"),
        *_pinned_kubernetes_packages(kubernetes, ETCD_NODE_KUBERNETES_PACKAGES),
    )
    started = (command("systemctl", "daemon-reload"), command("systemctl", "enable", "kubelet"))
    body = (
        "umask 022",
        *(() if from_bundle else ("export DEBIAN_FRONTEND=noninteractive",)),
        *_swap_off(),
        # containerd's snapshotter needs overlay; etcd needs no pod network, so no bridge netfilter or forwarding.
        *write_file(MODULES_FILE, "overlay\n"),
        command("modprobe", "overlay"),
        *(_containerd_configuration(kubernetes) if from_bundle else software),
        command("install", "-d", "-m", "0755", STATIC_POD_DIR),
        *write_file(ETCD_KUBELET_CONFIG_FILE, kubelet_config),
        *write_file(ETCD_KUBELET_DROP_IN, standalone_kubelet_drop_in()),
        *(() if from_bundle else (*started, command("systemctl", "restart", "kubelet"))),
        *write_file(PREPARED_MARKER, marker + "\n"),
    )
    return Script(step=STEP, host=hostname, done_when=marker_guard(marker), body=body)


def load_balancer_preparation(hostname: str, *, from_bundle: bool = False) -> Script:
    """Load balancers: haproxy and keepalived installed and enabled; their configs are written by a later step.

    Without the internet (an artifact bundle) they are the node image's: a missing one stops the step."""
    _check_hostname(hostname)
    missing = "kubeadm-ha: {} is not installed on " + hostname + " and there is no package source (artifacts: bundle)"
    install = (
        tuple(
            f"command -v {tool} >/dev/null"
            f" || {{ echo {quote(missing.format(tool) + ': use a node image with it')} >&2; exit 1; }}"
            for tool in ("haproxy", "keepalived")
        )
        if from_bundle
        else (
            logged(LOG_NAME, *APT_GET, "update"),
            logged(LOG_NAME, *APT_GET, "install", "--no-install-recommends", "haproxy", "keepalived"),
        )
    )
    body = (
        "umask 022",
        "export DEBIAN_FRONTEND=noninteractive",
        *write_file(SYSCTL_FILE, _sysctl_file(LOAD_BALANCER_SYSCTLS)),
        logged(LOG_NAME, "sysctl", "-p", SYSCTL_FILE),
        *install,
        # Enabled for boot; the later configuration step (re)starts them. Until then haproxy runs the package's
        # listener-free sample config, and keepalived's unit stays inactive for want of a config file.
        command("systemctl", "enable", "haproxy", "keepalived"),
        *write_file(PREPARED_MARKER, LOAD_BALANCER_MARKER + "\n"),
    )
    return Script(step=STEP, host=hostname, done_when=marker_guard(LOAD_BALANCER_MARKER), body=body)


# One entry per role that has a preparation: (hostname, kubernetes, from_bundle) -> Script.
PREPARATIONS: dict[str, Callable[[str, KubernetesConfig, bool], Script]] = {
    "lb": lambda hostname, kubernetes, from_bundle: load_balancer_preparation(hostname, from_bundle=from_bundle),
    "etcd": lambda hostname, kubernetes, from_bundle: etcd_node_preparation(
        hostname, kubernetes, from_bundle=from_bundle
    ),
    "cp": lambda hostname, kubernetes, from_bundle: kubernetes_node_preparation(
        hostname, kubernetes, from_bundle=from_bundle
    ),
}
PREPARATIONS["worker"] = PREPARATIONS["cp"]


def preparation_for(role: Role, hostname: str, kubernetes: KubernetesConfig, *, from_bundle: bool = False) -> Script:
    try:
        builder = PREPARATIONS[role]
    except KeyError:
        raise ValueError(f"no node preparation for role {role!r} (known: {', '.join(PREPARATIONS)})") from None
    return builder(hostname, kubernetes, from_bundle)


# Comment out active swap entries (third field `swap`); commented lines never match again.
_COMMENT_OUT_SWAP = command(
    "sed",
    "-i",
    "-E",
    r"s/^([^#[:space:]][^[:space:]]*[[:space:]]+[^[:space:]]+[[:space:]]+swap([[:space:]].*)?)$/"
    r"# disabled by kubeadm-ha: \1/",
    "/etc/fstab",
)


def _spoken_list(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _sysctl_file(settings: tuple[tuple[str, str], ...]) -> str:
    return "# Written by kubeadm-ha.\n" + "".join(f"{key} = {value}\n" for key, value in settings)


def _check_hostname(hostname: str) -> None:
    # The renderer puts the host into a `#` comment line as well as a quoted value: a line break there
    # would end the comment, so refuse control characters outright.
    if not hostname or any(ord(char) < 0x20 or ord(char) == 0x7F for char in hostname):
        raise ValueError(f"hostname {hostname!r} is empty or contains control characters")
