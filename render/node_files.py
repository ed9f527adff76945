"""File modes and owners CIS asks for that kubeadm and the Kubernetes packages leave otherwise (issue 20).

* The kubelet's configuration and unit files 0600 (CIS 4.1.1, 4.1.5, 4.1.9): the deb installs its unit and
  kubeadm's drop-in 0644 (kubernetes/release, packages/deb), and `kubeadm init`/`join`/`upgrade node` write
  /var/lib/kubelet/config.yaml 0644 (kubeadm `kubelet-start` phase). Nothing but root reads them.
* etcd's data directory owned by an `etcd` system user (CIS 1.1.12), 0700 (1.1.11). kubeadm runs etcd as root
  in its static pod, so the owner protects nothing that 0700 root does not; it is set so the benchmark holds
  and no data directory is left to another account, and kept after a restore (render/etcd_restore.py).

The step runs after kubeadm set the node up and again after every upgrade, which rewrites these files.
"""

from __future__ import annotations

from render.etcd import DATA_DIR
from render.node_prep import ETCD_KUBELET_CONFIG_FILE, ETCD_KUBELET_DROP_IN
from render.scripts import Script, quote
from render.scripts import command as shell

KUBELET_FILES = (
    "/var/lib/kubelet/config.yaml",
    "/var/lib/kubelet/kubeadm-flags.env",
    "/lib/systemd/system/kubelet.service",
    "/usr/lib/systemd/system/kubelet.service",
    "/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf",
    "/etc/systemd/system/kubelet.service",
    "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf",
)
ETCD_NODE_FILES = (ETCD_KUBELET_CONFIG_FILE, ETCD_KUBELET_DROP_IN)
ETCD_USER = "etcd"


def etcd_owner_lines(data_dir: str = DATA_DIR) -> tuple[str, ...]:
    """Shell lines giving `data_dir` to the `etcd` system user (created if missing), 0700."""
    return (
        f"if ! getent passwd {ETCD_USER} >/dev/null; then",
        "  " + shell("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", data_dir,
                     "--shell", "/usr/sbin/nologin", ETCD_USER),
        "fi",
        shell("chown", f"{ETCD_USER}:{ETCD_USER}", data_dir),
        shell("chmod", "0700", data_dir),
    )  # fmt: skip


def node_files_script(host: str, *, etcd_member: bool, version: str) -> Script:
    """Modes (and the etcd owner) on `host`; `version` only marks which Kubernetes release's files it checked,
    so that the step runs again after an upgrade."""
    files = " ".join(quote(path) for path in (*KUBELET_FILES, *(ETCD_NODE_FILES if etcd_member else ())))
    checks = [
        "files_hardened() {",
        "  local file",
        f"  for file in {files}; do",
        '    if [ -e "$file" ] && [ "$(stat -L -c %a "$file")" != 600 ]; then return 1; fi',
        "  done",
    ]
    if etcd_member:
        owner = quote(f"{ETCD_USER}:{ETCD_USER}:700")
        checks.append(f'  [ ! -d {quote(DATA_DIR)} ] || [ "$(stat -c %U:%G:%a {quote(DATA_DIR)})" = {owner} ]')
    checks.append("}")
    body = [
        f"echo {quote(f'kubeadm-ha: file modes for the Kubernetes {version} packages and kubeadm')}",
        f"for file in {files}; do",
        '  if [ -e "$file" ]; then chmod 0600 "$(readlink -f "$file")"; fi',
        "done",
    ]
    if etcd_member:
        body += [f"if [ -d {quote(DATA_DIR)} ]; then", *("  " + line for line in etcd_owner_lines()), "fi"]
    return Script(
        step="node-files",
        host=host,
        done_when="files_hardened",
        functions=tuple(checks),
        body=tuple(body),
    )
