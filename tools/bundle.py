"""Artifact bundles for air-gapped installs: assemble one on a connected machine, check it on the other side.

    # On a machine with internet access: everything the stack's nodes install, into one directory.
    python -m tools.bundle assemble --stack prod --out /srv/bundles/k8s-1.37.2

    # Carry the directory (or `tar -C DIR -cf bundle.tar .`) across, then on the air-gapped side:
    python -m tools.bundle check /srv/bundles/k8s-1.37.2 --stack prod

`check` reads every file and says, for each problem, which file and what to do; it exits 0 only when the
bundle holds everything the stack needs at the stack's versions with the digests its manifest pins. It prints
the manifest's sha256: pin it in Pulumi.<stack>.yaml as `artifacts.bundle.sha256` (with `artifacts.source:
bundle` and `artifacts.bundle.path`); `pulumi up` refuses any other bundle, and every node checks each file
again before installing it.

`assemble` downloads from the upstream locations (tools/bundle_fetch.py names them), verifying each binary
against the checksum its publisher puts beside it, each image blob against the digest its manifest names, and
the CNI manifest against the digest this program pins (model/versions.py); then it writes manifest.json.
`--from DIR` takes the files from a directory instead (DIR/bin/NAME, DIR/cni/NAME, DIR/images/*.tar OCI
archives, DIR/manifests/CNI.yaml): for binaries built or fetched by other means.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from model.bundle import (
    ARCHITECTURE,
    MANIFEST,
    BundleError,
    Entry,
    Manifest,
    cni_image_problems,
    digest,
    file_digest,
    file_problems,
    parse_manifest,
    read_manifest_bytes,
    requirement_problems,
)
from model.config import ClusterConfig
from model.rules import ConfigError
from model.stack import config_from_stack_file
from tools.bundle_fetch import Versions, fetch_all, local_files

REPO_ROOT = Path(__file__).resolve().parent.parent


def stack_config(stack: str, project_dir: Path) -> ClusterConfig:
    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        raise BundleError(f"{path}: no such stack file")
    try:
        return config_from_stack_file(str(path), stack)
    except ConfigError as error:
        raise BundleError(f"Pulumi.{stack}.yaml: {error}") from None


def check(bundle: Path, config: ClusterConfig) -> tuple[str, list[str]]:
    """(the manifest's sha256, every problem): the pin, the stack's needs, and each file's digest."""
    data = read_manifest_bytes(bundle)
    sha256 = digest(data)
    manifest = parse_manifest(data.decode(), f"{bundle}/{MANIFEST}")
    problems = requirement_problems(
        manifest,
        config.kubernetes.version,
        config.kubernetes.cni,
        images=config.artifacts.source == "internet" or config.artifacts.images_from_bundle,
        external_etcd=config.etcd.external,
    )
    pinned = config.artifacts.bundle.sha256 if config.artifacts.bundle is not None else None
    if pinned is not None and pinned != sha256:
        problems.append(
            f"{MANIFEST} has sha256 {sha256}; the stack pins {pinned} (artifacts.bundle.sha256): pin this "
            "bundle's digest, or use the bundle the stack pins"
        )
    with _readable(bundle) as root:
        problems += file_problems(root, manifest.entries)
        for entry in manifest.of_kind("cni-manifest"):
            if (root / entry.path).is_file():
                problems += cni_image_problems(manifest, (root / entry.path).read_text())
    return sha256, problems


class _readable:
    """The bundle as a directory: itself, or a .tar extracted into a temporary one (removed afterwards)."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.scratch: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self.bundle.is_dir():
            return self.bundle
        self.scratch = tempfile.TemporaryDirectory(prefix="kubeadm-ha-bundle-")
        with tarfile.open(self.bundle) as archive:
            archive.extractall(self.scratch.name, filter="data")
        return Path(self.scratch.name)

    def __exit__(self, *exc: object) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()


def write_bundle(out: Path, kubernetes_version: str, files: Sequence[tuple[Entry, Path]]) -> str:
    """Copy each (entry, local file) under `out` at entry.path, write the manifest; returns its sha256."""
    entries = []
    for entry, source in files:
        target = out / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        target.chmod(0o644)
        sha256 = file_digest(target)
        entries.append(Entry(entry.path, sha256, target.stat().st_size, entry.kind, entry.name, entry.version))
    manifest = Manifest(kubernetes_version, ARCHITECTURE, tuple(entries))
    text = manifest.to_json()
    (out / MANIFEST).write_text(text)
    return digest(text.encode())


def _report(sha256: str, problems: list[str], bundle: Path) -> int:
    for problem in problems:
        print(f"bundle: {bundle}: {problem}", file=sys.stderr)
    if problems:
        print(f"bundle: {bundle}: {len(problems)} problem(s); the bundle cannot be used", file=sys.stderr)
        return 1
    print(f"bundle: {bundle}: complete and verified; manifest sha256 {sha256}")
    print(f"  pin it: artifacts: {{source: bundle, bundle: {{path: {bundle}, sha256: {sha256}}}}}")
    return 0


def _assemble(out: Path, source: Path | None, versions: Versions, kubernetes_version: str) -> None:
    """Fetch (or take from `source`) and write the bundle into the new or empty `out`. If that fails, or is
    interrupted, `out` is left as it was found: a partly written one would refuse the re-run ("not empty")."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        files = local_files(source, versions) if source else fetch_all(out, versions)
        write_bundle(out, kubernetes_version, files)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        print(f"bundle: {out}: removed what this run had written", file=sys.stderr)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="verify a bundle (directory or .tar) against a stack")
    checking.add_argument("bundle", type=Path)
    checking.add_argument("--stack", required=True)
    checking.add_argument("--project-dir", type=Path, default=REPO_ROOT)
    assembling = commands.add_parser("assemble", help="assemble a bundle for a stack's release")
    assembling.add_argument("--stack", required=True)
    assembling.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    assembling.add_argument("--project-dir", type=Path, default=REPO_ROOT)
    assembling.add_argument("--from", dest="source", type=Path, help="take the files from this directory")
    Versions.add_arguments(assembling)
    args = parser.parse_args(argv)
    try:
        config = stack_config(args.stack, args.project_dir)
        if args.command == "check":
            sha256, problems = check(args.bundle, config)
            return _report(sha256, problems, args.bundle)
        if args.out.exists() and any(args.out.iterdir()):
            raise BundleError(f"{args.out}: not empty; assemble into a new directory")
        versions = Versions.from_arguments(args, config)
        _assemble(args.out, args.source, versions, config.kubernetes.version)
        return _report(*check(args.out, config), args.out)
    except BundleError as error:
        print(f"bundle: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
