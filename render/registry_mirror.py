"""containerd pulling through the site's registry mirror (`artifacts.registryMirror`), trusting only its CA.

One `hosts.toml` per mirrored registry under containerd's certs.d. Each names the mirror as its root `server`
and lists no other host: containerd's resolver tries the `[host]` entries and then `server`
(core/remotes/docker/config/hosts.go at v2.2.9, `parseHostsFile`: the root host config is appended last, and
is the registry itself only when `server` is absent), so no request ever goes to the upstream registry. A URL
with a path (a Harbor project) is used as given (`override_path`); one without gets containerd's `/v2`.

containerd 2.x reads certs.d by default; 1.7 only when the CRI config names it, so the step writes the
program's containerd config (render/node_prep.py) with `config_path` added, and restarts containerd only when
that file changed (running containers keep running: their shims are separate processes).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from model.artifacts import RegistryMirrorConfig
from render.node_prep import CONTAINERD_CONFIG_FILE, bundle_containerd_config
from render.scripts import Script, command, files_match, sha256_hex, write_file

STEP = "registry-mirror"
CERTS_DIR = "/etc/containerd/certs.d"
CA_FILE = f"{CERTS_DIR}/kubeadm-ha-mirror-ca.crt"


def containerd_mirror_config(pause_tag: str) -> str:
    """The program's containerd config (render/node_prep.py) with kubeadm's pause image as the sandbox image (the
    mirror then serves only the images kubeadm names) and the registry hosts directory."""
    return (
        bundle_containerd_config(pause_tag)
        + f"""
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{CERTS_DIR}"
"""
    )


def hosts_toml(registry: str, url: str) -> str:
    override = bool(urlsplit(url).path.strip("/"))
    lines = [
        f"# Written by kubeadm-ha: {registry} only through the site's mirror (artifacts.registryMirror).",
        f'server = "{url}"',
        'capabilities = ["pull", "resolve"]',
        f'ca = "{CA_FILE}"',
    ]
    if override:
        lines.append("override_path = true")
    return "\n".join(lines) + "\n"


def mirror_files(mirror: RegistryMirrorConfig, pause_tag: str) -> dict[str, str]:
    """Path -> content of every file the step writes."""
    files = {CA_FILE: mirror.ca_certificate, CONTAINERD_CONFIG_FILE: containerd_mirror_config(pause_tag)}
    for registry, url in mirror.registries.items():
        files[f"{CERTS_DIR}/{registry}/hosts.toml"] = hosts_toml(registry, url)
    return files


def registry_mirror_script(hostname: str, mirror: RegistryMirrorConfig, pause_tag: str) -> Script:
    files = mirror_files(mirror, pause_tag)
    config_unchanged = files_match({CONTAINERD_CONFIG_FILE: sha256_hex(files[CONTAINERD_CONFIG_FILE])})
    body: list[str] = ["umask 022", f"if {config_unchanged}; then restart=''; else restart=1; fi"]
    for path, content in files.items():
        body += write_file(path, content)
    body += [
        'if [ -n "$restart" ] && systemctl is-active --quiet containerd; then',
        "  " + command("systemctl", "restart", "containerd"),
        "fi",
    ]
    return Script(
        step=STEP,
        host=hostname,
        done_when=files_match({path: sha256_hex(content) for path, content in files.items()}),
        body=tuple(body),
    )
