"""The base-image step, run for real: bash, curl over HTTPS from a local server, sha256sum, gpg/gpgv.

The Ubuntu cloud image keyring is not packaged for Debian, so the signed-SHA256SUMS path is exercised
with a key made here, passed in place of the pinned one; the pinned fingerprint itself is a constant
(render/image.py) whose source is named there.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from model.config import ImageConfig
from model.rules import ConfigError
from model.stack import parse_config
from render.image import IMAGE_CACHE, cached_image_path, image_fetch_script
from tests.gnupg import agents_of, gnupg_home

IMAGE = b"QFI\xfb a tiny stand-in for a qcow2 image\n"


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """An HTTPS server on 127.0.0.1 serving a directory: (base URL, its directory, the CA bundle)."""
    root = tmp_path_factory.mktemp("https")
    served = root / "www"
    served.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = root / "cert.pem", root / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", served, cert_file
    finally:
        server.shutdown()
        server.server_close()


def run(image: ImageConfig, tmp_path: Path, ca: Path, **keys: str) -> subprocess.CompletedProcess[str]:
    text = image_fetch_script(image, **keys).render().replace(IMAGE_CACHE, str(tmp_path / "cache"))
    env = {**os.environ, "CURL_CA_BUNDLE": str(ca)}
    return subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=60, env=env, check=False)


def cached(image: ImageConfig, tmp_path: Path) -> Path:
    return Path(cached_image_path(image).replace(IMAGE_CACHE, str(tmp_path / "cache")))


def test_a_pinned_digest_is_checked_then_the_step_is_a_no_op(https: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, served, ca = https
    (served / "lab.qcow2").write_bytes(IMAGE)
    image = ImageConfig(url=f"{base}/lab.qcow2", sha256=hashlib.sha256(IMAGE).hexdigest())
    first = run(image, tmp_path, ca)
    assert first.returncode == 0, first.stderr
    assert cached(image, tmp_path).read_bytes() == IMAGE
    again = run(image, tmp_path, ca)
    assert again.returncode == 0 and "already done" in again.stdout


def test_a_cached_image_changed_after_its_check_is_fetched_and_checked_again(
    https: tuple[str, Path, Path], tmp_path: Path
) -> None:
    # Issue 18, defect 4: the fetch runs whenever a base volume is about to read the file, so its guard must
    # vouch for the file as it is now, not for a marker written when it was checked (a truncated copy, a
    # file another user of /var/tmp replaced).
    base, served, ca = https
    (served / "again.qcow2").write_bytes(IMAGE)
    image = ImageConfig(url=f"{base}/again.qcow2", sha256=hashlib.sha256(IMAGE).hexdigest())
    assert run(image, tmp_path, ca).returncode == 0
    target = cached(image, tmp_path)
    for damage in (IMAGE[:7], IMAGE + b"appended"):
        target.write_bytes(damage)
        again = run(image, tmp_path, ca)
        assert again.returncode == 0, again.stderr
        assert "already done" not in again.stdout
        assert target.read_bytes() == IMAGE
    # A local image (used in place) that changed after its check is refused, not handed to libvirt.
    local = tmp_path / "local.qcow2"
    local.write_bytes(IMAGE)
    in_place = ImageConfig.model_construct(url=str(local), sha256=hashlib.sha256(IMAGE).hexdigest())
    assert run(in_place, tmp_path, ca).returncode == 0
    local.write_bytes(IMAGE + b"changed")
    changed = run(in_place, tmp_path, ca)
    assert changed.returncode != 0 and "has SHA-256" in changed.stderr


def test_a_machine_with_an_empty_cache_fetches_and_checks_the_image(
    https: tuple[str, Path, Path], tmp_path: Path
) -> None:
    # A second operator's machine: the same script (the same cache path everywhere), nothing cached yet.
    base, served, ca = https
    (served / "second.qcow2").write_bytes(IMAGE)
    image = ImageConfig(url=f"{base}/second.qcow2", sha256=hashlib.sha256(IMAGE).hexdigest())
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(image, first, ca).returncode == 0
    fetched = run(image, second, ca)
    assert fetched.returncode == 0 and "already done" not in fetched.stdout
    assert cached(image, second).read_bytes() == IMAGE


def test_a_wrong_digest_leaves_nothing_in_the_cache(https: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, served, ca = https
    (served / "other.qcow2").write_bytes(IMAGE + b"tampered")
    image = ImageConfig(url=f"{base}/other.qcow2", sha256=hashlib.sha256(IMAGE).hexdigest())
    refused = run(image, tmp_path, ca)
    assert refused.returncode != 0
    assert f"image {base}/other.qcow2 has SHA-256" in refused.stderr and "nothing was changed" in refused.stderr
    target = cached(image, tmp_path)
    assert not target.exists() and not Path(f"{target}.download").exists()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], str, Path]]:
    """A real OpenPGP signing key: the gpg command that signs with it, its fingerprint, a keyring holding it."""
    if shutil.which("gpgv") is None:
        pytest.skip("gpgv is not installed")
    home = tmp_path_factory.mktemp("signer")
    with gnupg_home(home) as gpg:
        yield _make_signer(gpg, home)
    assert not agents_of(home), "gpg-agent outlived the signer's home"


def _make_signer(gpg: list[str], home: Path) -> tuple[list[str], str, Path]:
    for who in ("images", "stranger"):
        subprocess.run([*gpg, "--quick-gen-key", f"{who}@test.invalid", "ed25519", "sign", "never"], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys", "images@test.invalid"], check=True,
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    keyring = home / "trusted.gpg"
    keyring.write_bytes(subprocess.run([*gpg, "--export"], check=True, capture_output=True, timeout=60).stdout)
    return gpg, fingerprint, keyring


def publish(served: Path, gpg: list[str], who: str, listing: str) -> None:
    (served / "SHA256SUMS").write_text(listing)
    (served / "SHA256SUMS.gpg").unlink(missing_ok=True)
    subprocess.run([*gpg, "--local-user", f"{who}@test.invalid", "--detach-sign", "--output",
                    str(served / "SHA256SUMS.gpg"), str(served / "SHA256SUMS")], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def test_an_image_listed_in_a_sums_file_signed_by_the_pinned_key_is_accepted(
    https: tuple[str, Path, Path], signer: tuple[list[str], str, Path], tmp_path: Path
) -> None:
    base, served, ca = https
    gpg, fingerprint, keyring = signer
    (served / "cloud.img").write_bytes(IMAGE)
    # Not an Ubuntu URL, so built without validation: the config would (rightly) ask for image.sha256.
    image = ImageConfig.model_construct(url=f"{base}/cloud.img", sha256=None)
    keys = {"keyring": str(keyring), "signing_key": fingerprint}

    publish(served, gpg, "images", f"{hashlib.sha256(b'x').hexdigest()} *other.img\n"
            f"{hashlib.sha256(IMAGE).hexdigest()} *cloud.img\n")  # fmt: skip
    accepted = run(image, tmp_path, ca, **keys)
    assert accepted.returncode == 0, accepted.stderr
    assert cached(image, tmp_path).read_bytes() == IMAGE

    cases = {
        "stranger": ("stranger", f"{hashlib.sha256(IMAGE).hexdigest()} *cloud.img\n", "is not signed by the key"),
        "unlisted": ("images", f"{hashlib.sha256(IMAGE).hexdigest()} *else.img\n", "expected <not listed>"),
        "mismatch": ("images", f"{hashlib.sha256(b'y').hexdigest()} *cloud.img\n", "has SHA-256"),
    }
    for case, (who, listing, message) in cases.items():
        fresh = tmp_path / case
        publish(served, gpg, who, listing)
        refused = run(image, fresh, ca, **keys)
        assert refused.returncode != 0, case
        assert message in refused.stderr and "nothing was changed" in refused.stderr, (case, refused.stderr)
        assert not list((fresh / "cache").rglob("*.img*")), case


def test_images_that_cannot_be_verified_are_refused_with_their_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"network": {"cidr": "10.17.5.0/24"}, "image": "https://mirror.example/x.qcow2"}, stack="t")
    assert "give image.sha256" in str(caught.value) and "image:" in str(caught.value)
    with pytest.raises(ConfigError) as plain_http:
        parse_config({"network": {"cidr": "10.17.5.0/24"}, "image": {"url": "http://cloud-images.ubuntu.com/a.img"}},
                     stack="t")  # fmt: skip
    assert "image.url" in str(plain_http.value)
    resolute = "https://cloud-images.ubuntu.com/releases/26.04/release/ubuntu-26.04-server-cloudimg-amd64.img"
    assert parse_config({"network": {"cidr": "10.17.5.0/24"}, "image": resolute}, stack="t").image.url == resolute
