"""The node's SSH host private key reaches it on a small raw disk of its own, never in the cloud-init seed.

terraform-provider-libvirt 0.8.1 logs the whole cloud-init definition, user-data included, when it creates
the disk (resource_libvirt_cloud_init.go, `log.Printf("[INFO] cloudInit: %+v", ...)`) and again on every read
(cloudinit_def.go, `Read cloud-init from file`). The Pulumi bridge forwards every such line to the engine
as a debug diagnostic whatever TF_LOG says (pulumi-terraform-bridge v3.99.0 pkg/tfbridge/log.go,
`handleLogMessage`), and the engine keeps it in `--event-log` and `--json` output. A volume made from a
local file is different: the provider logs its path and size, never its bytes (resource_libvirt_volume.go,
volume_image.go). So the key goes into a file on the machine running Pulumi (a secret-stdin step writes it
there, private to its user), libvirt copies it into a raw volume, a second step removes the file, and the
node's first boot copies it from that disk (`bootcmd`, which cloud-init runs before its `ssh` module and
before sshd starts).
"""

from __future__ import annotations

from render.scripts import Script, quote

# The disk is the domain's second disk (components/vm.py): terraform-provider-libvirt 0.8.1 names the
# n-th `disk` vd<letter n> on the virtio bus (disk_def.go, newDefDisk).
HOST_KEY_DEVICE = "/dev/vdb"
# Whole sectors: the key (about 400 bytes for ed25519) followed by zeros.
HOST_KEY_DISK_BYTES = 4096
HOST_KEY_FILE = "/etc/ssh/ssh_host_ed25519_key"
# Patterns (basic regular expressions), spelled so that no script holds the marker of a private key itself:
# secret scanners look for it (tests/real/engine/secrets_scan.py; render/scripts.py's scrubber does the same).
_BEGIN = "-----BEGIN OPENSSH PRIVATE[ ]KEY-----"
_END = "-----END OPENSSH PRIVATE[ ]KEY-----"


def host_key_disk_write_script(host: str, path: str) -> Script:
    """On the machine running Pulumi: the private key on stdin into `path` (0600 in a 0700 directory),
    zero-padded to HOST_KEY_DISK_BYTES. It runs only when the disk is about to be created (its triggers), so
    it writes whatever is there."""
    directory = path.rsplit("/", 1)[0]
    part = path + ".part"
    return Script(
        step="host-key-disk",
        host=host,
        on_node=False,
        done_when="false",
        body=(
            f"mkdir -p {quote(directory)}",
            f"chmod 0700 {quote(directory)}",
            f"cat >{quote(part)}",
            f"if ! head -n 1 {quote(part)} | grep -qx -- {quote(_BEGIN)}; then",
            f"  rm -f {quote(part)}",
            '  echo "kubeadm-ha: the host key given for ${KUBEADM_HA_HOST} is not an OpenSSH private key" >&2',
            "  exit 1",
            "fi",
            f"truncate -s {HOST_KEY_DISK_BYTES} {quote(part)}",
            f"mv -f {quote(part)} {quote(path)}",
        ),
        secret_stdin=True,
    )


def host_key_disk_cleanup_script(host: str, path: str) -> Script:
    """On the machine running Pulumi, once libvirt holds the volume: the file is no longer needed."""
    return Script(
        step="host-key-disk-cleanup",
        host=host,
        on_node=False,
        done_when=f"[ ! -e {quote(path)} ] && [ ! -e {quote(path + '.part')} ]",
        body=(f"rm -f {quote(path)} {quote(path + '.part')}",),
    )


def install_host_key_command(public_key: str) -> str:
    """cloud-init `bootcmd` (sh, every boot, before the `ssh` module and sshd): remove every host key the
    image has, install the private key from the disk, and refuse one that is not the pinned key's pair."""
    key, staged = quote(HOST_KEY_FILE), "/run/kubeadm-ha-host-key"
    return "\n".join(
        (
            "set -eu",
            "umask 077",
            f"sed -n {quote(f'/^{_BEGIN}$/,/^{_END}$/p')} {quote(HOST_KEY_DEVICE)} >{staged}",
            f'if [ "$(ssh-keygen -y -f {staged} | cut -d" " -f1-2)" != {quote(_pair(public_key))} ]; then',
            f'  echo "kubeadm-ha: {HOST_KEY_DEVICE} does not hold the pinned SSH host key" >&2',
            f"  rm -f {staged}",
            "  exit 1",
            "fi",
            "rm -f /etc/ssh/ssh_host_*key*",
            f"mv {staged} {key}",
            f"printf '%s\\n' {quote(public_key)} >{key}.pub",
            f"chmod 0644 {key}.pub",
        )
    )


def _pair(public_key: str) -> str:
    """`ssh-ed25519 AAAA...`: what `ssh-keygen -y` prints, without the comment."""
    return " ".join(public_key.split()[:2])
