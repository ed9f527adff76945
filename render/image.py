"""The base image every VM boots: fetched on the machine running Pulumi and checked before libvirt sees it.

The libvirt provider downloads a `source` URL as it is, with no checksum, and adopts what it got. So the
program fetches the image itself, in a local step, into a cache whose path depends only on the URL (the
same on every operator's machine, so another operator's run is not a diff), and hands libvirt the
verified file. What "verified" means:

- `image.sha256` given: the file has exactly that SHA-256;
- an Ubuntu cloud image without one: the `SHA256SUMS` beside it carries a valid signature by the Ubuntu
  cloud image signing key, pinned here by fingerprint, and lists the file's SHA-256. Ubuntu replaces
  `release/` images in place with each refresh, so a digest pinned in a stack file would go stale; the
  signature does not.
"""

from __future__ import annotations

import hashlib
import posixpath

from model.config import ImageConfig
from render.scripts import Script, quote

# "UEC Image Automatic Signing Key <cdimage@ubuntu.com>", which signs cloud-images.ubuntu.com's SHA256SUMS.
# It ships in the `ubuntu-keyring` package (Debian and Ubuntu) as the keyring below.
UBUNTU_CLOUD_IMAGE_KEY = "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"
UBUNTU_CLOUD_IMAGE_KEYRING = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg"
# World-readable, outside any home directory: the path must be the same wherever Pulumi runs.
IMAGE_CACHE = "/var/tmp/kubeadm-ha/images"
_FETCH = ("curl", "--fail", "--silent", "--show-error", "--location", "--proto", "=https", "--retry", "5")


def cached_image_path(image: ImageConfig) -> str:
    """Where the verified image lives on the machine running Pulumi (a local image is used in place)."""
    if not image.downloaded:
        return image.url
    key = hashlib.sha256(image.url.encode()).hexdigest()[:16]
    return f"{IMAGE_CACHE}/{key}/{posixpath.basename(image.url)}"


# Shell fragments over the variables the script sets first (all values enter through `quote`).
_CHECK_SIGNATURE = (
    'curl "${fetch[@]}" --output "$sums" "$base/SHA256SUMS"',
    'curl "${fetch[@]}" --output "$signature" "$base/SHA256SUMS.gpg"',
    # VALIDSIG's last field is the primary key's fingerprint: the signature must be the pinned key's.
    'status="$(gpgv --status-fd 1 --keyring "$keyring" "$signature" "$sums" 2>/dev/null)" || status=""',
    'if ! printf \'%s\\n\' "$status" | awk \'$2 == "VALIDSIG" { print $NF }\' | grep -qx "$key"; then',
    '  echo "kubeadm-ha: $base/SHA256SUMS is not signed by the key $key (keyring $keyring); nothing was changed" >&2',
    '  rm -f "$partial" "$sums" "$signature"',
    "  exit 1",
    "fi",
    # SHA256SUMS lines are `<digest> *<file>` (binary mode) or `<digest>  <file>`.
    'expected="$(awk -v name="$name" \'{ f = $2; sub(/^\\*/, "", f); if (f == name) print $1 }\' "$sums")"',
    'rm -f "$sums" "$signature"',
)
_CHECK_DIGEST = (
    'actual="$(sha256sum "$checked" | cut -d" " -f1)"',
    'if [ -z "$expected" ] || [ "$actual" != "$expected" ]; then',
    '  echo "kubeadm-ha: image $url has SHA-256 $actual, expected ${expected:-<not listed>}; nothing was changed" >&2',
    '  [ "$checked" = "$target" ] || rm -f "$checked"',
    "  exit 1",
    "fi",
)


def image_fetch_script(
    image: ImageConfig, *, keyring: str = UBUNTU_CLOUD_IMAGE_KEYRING, signing_key: str = UBUNTU_CLOUD_IMAGE_KEY
) -> Script:
    """Download and verify the image into the cache, or check a local one; a no-op once it is there."""
    target = cached_image_path(image)
    verified = target + ".verified"
    marker = f"{image.url} {image.sha256 or 'signed ' + signing_key}"
    # The step runs whenever a hypervisor's base volume is about to be created (components/vm.py), so the
    # guard vouches for the file as it is now: the marker names what was checked, and its second line is
    # the SHA-256 the file had then, hashed again here (a truncated or replaced file is fetched and checked
    # again; a few seconds for a cloud image).
    guard = (
        f'[ -f {quote(target)} ] && [ "$(sed -n 1p {quote(verified)} 2>/dev/null)" = {quote(marker)} ]'
        f' && [ "$(sed -n 2p {quote(verified)} 2>/dev/null)" = "$(sha256sum <{quote(target)} | cut -d" " -f1)" ]'
    )
    partial = target + ".download"
    body: list[str] = [
        f"url={quote(image.url)} target={quote(target)} name={quote(posixpath.basename(image.url))}",
        # Quoted by hand: `quote` leaves `=https` bare, which reads like an assignment inside an array.
        "fetch=(" + " ".join(f"'{word}'" for word in _FETCH[1:]) + ")",
    ]
    if image.downloaded:
        body += [
            f"checked={quote(partial)} partial={quote(partial)}",
            'mkdir -p "$(dirname "$target")"',
            'curl "${fetch[@]}" --output "$partial" "$url"',
        ]
    else:
        body += [
            'checked="$target"',
            '[ -r "$target" ] || { echo "kubeadm-ha: image $target is not readable" >&2; exit 1; }',
        ]
    if image.sha256 is not None:
        body.append(f"expected={quote(image.sha256)}")
    else:
        body += [
            f"base={quote(posixpath.dirname(image.url))} key={quote(signing_key)} keyring={quote(keyring)}",
            'sums="$partial.SHA256SUMS" signature="$partial.SHA256SUMS.gpg"',
            *_CHECK_SIGNATURE,
        ]
    body += [
        *_CHECK_DIGEST,
        *(['mv -f "$partial" "$target"'] if image.downloaded else []),
        f"printf '%s\\n%s\\n' {quote(marker)} \"$actual\" >{quote(verified)}",
        'chmod 0644 "$target" ' + quote(verified),
    ]
    return Script(step="fetch-image", host="operator", done_when=guard, body=tuple(body), on_node=False)
