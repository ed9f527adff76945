"""Pinning each remote hypervisor's SSH host key for the libvirt provider.

terraform-provider-libvirt 0.8.1 (inside pulumi-libvirt 0.5.4) does not hand a `qemu+ssh://` URI to
libvirt's client: it dials SSH itself with Go's x/crypto/ssh (`libvirt/uri/ssh.go`). From the URI's query
it reads `knownhosts=PATH` (libvirt's own `known_hosts` is not read), expands it with `os.ExpandEnv` and
checks the host key against that file, under the URI's host name on port 22; without the parameter it uses
`$HOME/.ssh/known_hosts`. `no_verify`, present with any value (`no_verify=0` too), and
`known_hosts_verify=ignore` switch the check off.

So each hypervisor with a `hostKey` gets a known_hosts file of its own, and its provider's URI points at it.
The file is written when the program starts, before the provider is registered: the engine configures a
provider (which connects) only once it is registered, in a preview as in an update. Its bytes depend only on
the stack file, so every run writes the same file. The path goes into the URI with `$HOME` unexpanded; the
provider expands it in the same environment the program runs in (the CLI starts both), and the provider's
`uri` input stays the same on every operator's machine and checkout, so it is never a diff.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

KNOWN_HOSTS_ROOT = "$HOME/.cache/kubeadm-ha/known_hosts"
KNOWN_HOSTS_PARAMETER = "knownhosts"
# Parameters that choose or switch off the host key check: the program owns that choice.
_VERIFICATION_PARAMETERS = ("knownhosts", "known_hosts", "known_hosts_verify", "no_verify")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_HOST_KEY = re.compile(r"^ssh-ed25519 (?P<blob>[A-Za-z0-9+/]+={0,2})( [^\n]*)?$")
_ED25519 = b"ssh-ed25519"


def is_ssh_uri(uri: str) -> bool:
    return urlsplit(uri).scheme.endswith("+ssh")


def uri_problems(uri: str) -> list[str]:
    """Why the provider could not check a `qemu+ssh://` URI's host against a pinned key (empty: it can)."""
    parts = urlsplit(uri)
    problems = []
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        problems.append(f"{uri!r} names an IPv6 literal, which the provider's known_hosts lookup mangles; use a name")
    elif ":" in host:
        problems.append(
            f"{uri!r} names a port; terraform-provider-libvirt 0.8.1 dials host:port:port then (fixed in 0.8.2), "
            "so use port 22"
        )
    elif not _HOST.match(host):
        problems.append(f"{uri!r} needs a host name or IPv4 address after '//' (user@host)")
    overridden = sorted(
        {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)} & set(_VERIFICATION_PARAMETERS)
    )
    if overridden:
        problems.append(
            f"{uri!r} sets {', '.join(overridden)}; the program pins hostKey through its own known_hosts file "
            "(`no_verify` with any value switches the check off)"
        )
    return problems


def ed25519_key_problem(text: str) -> str | None:
    """Why `text` is not a single `ssh-ed25519 BASE64 [comment]` public key (None: it is one)."""
    match = _HOST_KEY.match(text.strip())
    if not match:
        hint = " (drop the host name ssh-keyscan prints first)" if " ssh-ed25519 " in text else ""
        return f"{text.strip()[:40]!r}... is not an `ssh-ed25519 AAAA...` public key{hint}"
    try:
        blob = base64.b64decode(match["blob"], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        name, rest = blob[4 : 4 + length], blob[4 + length :]
        (key_length,) = struct.unpack(">I", rest[:4])
        intact = name == _ED25519 and key_length == 32 and len(rest) == 36
    except (binascii.Error, struct.error):
        intact = False
    return None if intact else "the key's base64 is not a complete ssh-ed25519 key (copied only in part?)"


def known_hosts_path(project: str, stack: str, hypervisor: str) -> str:
    """The file's path as written into the URI, with `$HOME` for the provider to expand."""
    return f"{KNOWN_HOSTS_ROOT}/{project}/{stack}/{hypervisor}"


def known_hosts_line(uri: str, host_key: str) -> str:
    """`host ssh-ed25519 KEY`: port 22, so the plain host form Go's knownhosts matches (no `[host]:22`)."""
    host = urlsplit(uri).netloc.rpartition("@")[2]
    key_type, blob = host_key.split()[:2]
    return f"{host} {key_type} {blob}\n"


def pinned_uri(uri: str, path: str) -> str:
    """`uri` with `knownhosts=path` added to its query."""
    separator = "&" if urlsplit(uri).query else "?"
    return f"{uri}{separator}{KNOWN_HOSTS_PARAMETER}={path}"


def expand_home(path: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> Path:
    """`path` as the provider will read it: `$HOME` replaced by the environment's HOME."""
    home = environ.get("HOME", "")
    if not home.startswith("/"):
        raise RuntimeError(
            "HOME is not set to an absolute path; the libvirt provider finds the pinned known_hosts file "
            "under $HOME, so set HOME for pulumi"
        )
    return Path(path.replace("$HOME", home, 1))


def write_known_hosts(path: Path, content: str) -> bool:
    """Make `path` hold exactly `content` (0600, in 0700 directories); True when it was written."""
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written beside the target and renamed over it, so the provider never reads a half-written file.
    descriptor, temporary = tempfile.mkstemp(prefix=".known_hosts-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def pin_host_key(uri: str, host_key: str, *, project: str, stack: str, hypervisor: str) -> str:
    """Write the hypervisor's known_hosts file and return the URI that makes the provider check against it."""
    path = known_hosts_path(project, stack, hypervisor)
    write_known_hosts(expand_home(path), known_hosts_line(uri, host_key))
    return pinned_uri(uri, path)
