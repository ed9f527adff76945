"""Pinned downloads, run with the real bash, curl, sha256sum and gpg: the bytes or key are the pinned
ones, or the step stops naming the host and the file, and nothing that was there changes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from render.scripts import Script, download_signing_key, download_verified
from tests.gnupg import agents_of, gnupg_home

FETCH = ("curl", "--fail", "--silent", "--show-error")


def run(body: tuple[str, ...], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = Script(step="fetch", host="node-1", done_when="false", body=body)
    text = script.render().replace("/var/log/kubeadm-ha", str(tmp_path / "log"))
    return subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=60, check=False)


def test_a_file_with_the_pinned_digest_lands_and_any_other_is_refused(tmp_path: Path) -> None:
    served = tmp_path / "manifest.yaml"
    served.write_text("kind: DaemonSet\n")
    target = tmp_path / "cni.yaml"
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    ok = run(download_verified(FETCH, served.as_uri(), str(target), digest), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert target.read_text() == "kind: DaemonSet\n"

    served.write_text("kind: DaemonSet\n# tampered\n")
    refused = run(download_verified(FETCH, served.as_uri(), str(target), digest), tmp_path)
    assert refused.returncode != 0
    assert f"on node-1: {served.as_uri()} (for {target})" in refused.stderr and digest in refused.stderr
    assert target.read_text() == "kind: DaemonSet\n"  # what was there is untouched
    assert not Path(str(target) + ".download").exists()


def test_a_digest_that_is_not_sha256_is_refused_when_rendering() -> None:
    with pytest.raises(ValueError):
        download_verified(FETCH, "https://example.invalid/x", "/tmp/x", "ABC")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    """Two real OpenPGP keys, each with an encryption subkey as a repository key has: fingerprint, export."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path_factory.mktemp("gnupg")
    with gnupg_home(home) as gpg:
        yield _make_keys(gpg, home)
    assert not agents_of(home), "gpg-agent outlived the test keys' home"


def _make_keys(gpg: list[str], home: Path) -> dict[str, tuple[str, Path]]:
    found: dict[str, tuple[str, Path]] = {}
    for name in ("repo", "other"):
        subprocess.run([*gpg, "--quick-gen-key", f"{name} <{name}@test.invalid>", "ed25519", "sign", "never"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        listing = subprocess.run([*gpg, "--with-colons", "--list-keys", f"{name}@test.invalid"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        subprocess.run([*gpg, "--quick-add-key", fingerprint, "cv25519", "encr", "never"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        export = home / f"{name}.asc"
        export.write_bytes(subprocess.run([*gpg, "--armor", "--export", fingerprint], check=True,
                                          capture_output=True, timeout=60).stdout)  # fmt: skip
        found[name] = (fingerprint, export)
    both = home / "both.asc"
    both.write_bytes(found["repo"][1].read_bytes() + found["other"][1].read_bytes())
    found["both"] = (found["repo"][0], both)
    return found


def test_only_the_key_with_the_pinned_fingerprint_is_installed(
    keys: dict[str, tuple[str, Path]], tmp_path: Path
) -> None:
    fingerprint, export = keys["repo"]
    target = tmp_path / "release.key"
    ok = run(download_signing_key(FETCH, export.as_uri(), str(target), fingerprint), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert target.read_bytes() == export.read_bytes()

    for foreign in ("other", "both"):  # another key, or the right key with a stranger beside it
        refused = run(download_signing_key(FETCH, keys[foreign][1].as_uri(), str(target), fingerprint), tmp_path)
        assert refused.returncode != 0
        assert "on node-1:" in refused.stderr and fingerprint in refused.stderr and str(target) in refused.stderr
        assert target.read_bytes() == export.read_bytes()
