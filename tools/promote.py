"""Promote the release a stack runs to the next stack in the chain (dev -> staging -> prod).

    python -m tools.promote TARGET [--from SOURCE] [--source-outputs FILE] [--target-outputs FILE] [--dry-run]
    python -m tools.promote TARGET --find-revision [--target-outputs FILE]

Reads what SOURCE (default: TARGET's `promotion.from`) has deployed (`pulumi stack output --json`, or
FILE), rewrites only the release keys of Pulumi.TARGET.yaml to it, removing those it runs without (every
other byte, comments included, stays as it is), and prints the offline plan diff of TARGET before and
after. Refuses, with a one-line reason and exit status 1, to skip a link of the chain, to promote from a
source whose stack file or program differs from what it runs (undeployed edits), and a promotion TARGET's
own rules would refuse (configuration validation, judged against TARGET's last deployment, and the gate).
`--dry-run` prints the same and writes nothing.

`--find-revision` names the git commits whose program is the one TARGET runs (its `programDigest` output):
the revision to run TARGET's routine `pulumi up` from, which its promotion gate always lets through.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.promotion import judge
from model.config import CONFIG_NAMESPACE, ClusterConfig
from model.previous import PreviousDeployment
from model.release import (
    PROGRAM_DIGEST_OUTPUT,
    RELEASE_OUTPUT,
    SCALAR_SHORTHANDS,
    deployment_outputs,
    digest_of,
    has_deployed,
    is_program_file,
    program_digest,
    release_differences,
    release_of,
    stack_settings,
)
from model.rules import ConfigError
from model.stack import parse_config
from tools.offline import REPO_ROOT, evaluate
from tools.plan import write_plan
from tools.stack_yaml import Refused, effective_config, expected_config, remove_settings, rewrite_settings

PULUMI_TIMEOUT_SECONDS = 60
GIT_TIMEOUT_SECONDS = 120
_PREFIX = f"{CONFIG_NAMESPACE}:"


# --------------------------------------------------------------------------- reading outputs


def read_outputs(stack: str, file: Path | None, project_dir: Path) -> dict[str, Any]:
    """A stack's outputs: from FILE (`pulumi stack output --json` of it), else from the Pulumi CLI."""
    if file is not None:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise Refused(f"cannot read {stack}'s outputs from {file}: {error}") from None
    else:
        command = ["pulumi", "stack", "output", "--json", "--stack", stack]
        try:
            done = subprocess.run(
                command, cwd=project_dir, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_SECONDS, check=False
            )
        except FileNotFoundError:
            raise Refused(
                f"the pulumi CLI is not installed; pass {stack}'s outputs as a file (pulumi stack output --json)"
            ) from None
        except subprocess.TimeoutExpired:
            raise Refused(f"`{' '.join(command)}` did not answer within {PULUMI_TIMEOUT_SECONDS} s") from None
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no error output"])[-1]
            raise Refused(f"`{' '.join(command)}` failed: {detail}")
        try:
            data = json.loads(done.stdout or "{}")
        except json.JSONDecodeError as error:
            raise Refused(f"`{' '.join(command)}` printed no JSON: {error}") from None
    if not isinstance(data, dict):
        raise Refused(f"{stack}'s outputs are not a JSON object")
    return data


# --------------------------------------------------------------------------- the promotion


@dataclass(frozen=True)
class Promotion:
    target: str
    source: str
    before: str
    after: str
    changed: dict[tuple[str, ...], str]
    plan_diff: str
    removed: tuple[tuple[str, ...], ...] = ()


def _stack_file(project_dir: Path, stack: str) -> Path:
    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        raise Refused(f"no stack file {path.name} in {project_dir}")
    return path


def read_text(path: Path) -> str:
    # newline="" keeps CRLF line ends as they are: the rewrite must leave every other byte alone.
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _raw_config(text: str) -> dict[str, Any]:
    document = yaml.safe_load(text) or {}
    config = document.get("config") or {}
    return {key.removeprefix(_PREFIX): value for key, value in config.items() if key.startswith(_PREFIX)}


def _one_line(error: ConfigError) -> str:
    return "; ".join(str(problem) for problem in error.problems)


def _parse(text: str, stack: str, previous: PreviousDeployment, what: str) -> ClusterConfig:
    try:
        return parse_config(_raw_config(text), stack=stack, previous=previous)
    except ConfigError as error:
        raise Refused(f"{what}: {_one_line(error)}") from None


def prepare(
    target: str,
    *,
    source: str | None,
    source_outputs: Mapping[str, Any] | None = None,
    target_outputs: Mapping[str, Any] | None = None,
    project_dir: Path = REPO_ROOT,
    source_outputs_file: Path | None = None,
    target_outputs_file: Path | None = None,
) -> Promotion:
    """Work out the promotion into `target` and check it; raises Refused with the reason. Writes nothing."""
    target_path = _stack_file(project_dir, target)
    before = read_text(target_path)
    current = _parse(before, target, PreviousDeployment(), f"Pulumi.{target}.yaml is invalid")
    if current.promotion is None:
        raise Refused(f"{target} has no promotion.from in Pulumi.{target}.yaml: it is the start of the chain")
    declared = current.promotion.source
    if source is not None and source != declared:
        raise Refused(
            f"{target} promotes from {declared} (promotion.from in Pulumi.{target}.yaml), not {source}: "
            f"promoting from {source} would skip a link of the chain"
        )

    outputs = (
        dict(source_outputs) if source_outputs is not None else read_outputs(declared, source_outputs_file, project_dir)
    )
    if not has_deployed(outputs):
        raise Refused(
            f"{declared} has never finished a deployment (no release output); pulumi up --stack {declared} first"
        )
    running = outputs[RELEASE_OUTPUT]
    source_file = read_text(_stack_file(project_dir, declared))
    declared_config = _parse(source_file, declared, PreviousDeployment(), f"Pulumi.{declared}.yaml is invalid")
    edits = release_differences(release_of(declared_config), running)
    if edits:
        listing = "; ".join(d.describe(f"Pulumi.{declared}.yaml says", f"{declared} runs") for d in edits)
        raise Refused(f"{declared} has undeployed edits ({listing}); pulumi up --stack {declared} first")
    digest = program_digest(project_dir)
    if outputs.get(PROGRAM_DIGEST_OUTPUT) != digest:
        raise Refused(
            f"{declared} runs program {outputs.get(PROGRAM_DIGEST_OUTPUT)}, this checkout is {digest}: deploy this "
            f"checkout to {declared} first (pulumi up --stack {declared}), or check out the revision {declared} runs"
        )

    wanted = stack_settings(running)
    have = stack_settings(release_of(current))
    changed = {path: value for path, value in wanted.items() if have.get(path) != value}
    # A release key the target declares and the source runs without (image.sha256 beside a signed image).
    removed = tuple(path for path in have if path not in wanted)
    after = remove_settings(rewrite_settings(before, changed, SCALAR_SHORTHANDS) if changed else before, removed)
    if expected_config(yaml.safe_load(before), changed, removed) != effective_config(yaml.safe_load(after)):
        raise Refused(f"internal error: rewriting Pulumi.{target}.yaml would change more than {[*changed, *removed]}")

    previous = PreviousDeployment(
        dict(target_outputs) if target_outputs is not None else read_outputs(target, target_outputs_file, project_dir)
    )
    promoted = _parse(after, target, previous, f"{target}'s own rules refuse the promotion")
    refusal = judge(
        stack=target,
        source=declared,
        wanted_release=release_of(promoted),
        wanted_digest=digest,
        # As for a new stack: a promotion must deploy what the source runs, not pass as a re-apply of the target.
        deployed={},
        source_outputs=outputs,
    )
    if refusal is not None:
        raise Refused(f"{target}'s promotion gate would still refuse: " + "; ".join(refusal.reasons))
    plan_diff = diff_plans(
        target,
        declared,
        before=(before, deployment_outputs(current, digest)),
        after=(after, outputs),
        previous=previous.outputs,
        project_dir=project_dir,
    )
    return Promotion(target, declared, before, after, changed, plan_diff, removed)


def diff_plans(
    target: str,
    source: str,
    *,
    before: tuple[str, Mapping[str, Any]],
    after: tuple[str, Mapping[str, Any]],
    previous: Mapping[str, Any],
    project_dir: Path,
) -> str:
    """The unified diff of `target`'s offline plan (tools.plan) for two stack files.

    Each is evaluated against its own source outputs: the current file as the source ran it (what the target
    was admitted with), the promoted one against what the source runs now. Both start from the target's last
    deployment, so the second shows the steps the promotion adds (an upgrade, say).
    """
    with tempfile.TemporaryDirectory(prefix="kubeadm-ha-promote-") as scratch:
        roots = []
        for label, (text, source_outputs) in (("before", before), ("after", after)):
            evaluation = evaluate(
                target,
                project_dir=project_dir,
                config=(yaml.safe_load(text) or {}).get("config") or {},
                previous_outputs=previous,
                stack_outputs={source: source_outputs},
            )
            root = Path(scratch) / label
            write_plan(evaluation, root)
            roots.append(root)
        return _diff_trees(*roots)


def _diff_trees(before: Path, after: Path) -> str:
    files = sorted(
        {path.relative_to(root).as_posix() for root in (before, after) for path in root.rglob("*") if path.is_file()}
    )
    chunks: list[str] = []
    for name in files:
        if name.endswith(".svg"):
            continue  # a rendering of graph.dot, which is diffed
        old, new = before / name, after / name
        old_lines = old.read_text().splitlines(keepends=True) if old.is_file() else []
        new_lines = new.read_text().splitlines(keepends=True) if new.is_file() else []
        chunks.extend(difflib.unified_diff(old_lines, new_lines, f"before/{name}", f"after/{name}"))
    return "".join(chunk if chunk.endswith("\n") else chunk + "\n" for chunk in chunks)


# --------------------------------------------------------------------------- the revision a stack runs


def _git(project_dir: Path, *args: str, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(
            ["git", *args], cwd=project_dir, input=stdin, capture_output=True, timeout=GIT_TIMEOUT_SECONDS, check=False
        )
    except FileNotFoundError:
        raise Refused("git is not installed: --find-revision reads the program's history from git") from None
    except subprocess.TimeoutExpired:
        raise Refused(f"`git {args[0]}` did not answer within {GIT_TIMEOUT_SECONDS} s") from None
    if done.returncode != 0:
        detail = (done.stderr.decode(errors="replace").strip().splitlines() or ["no error output"])[-1]
        raise Refused(f"`git {' '.join(args[:2])}` failed in {project_dir}: {detail}")
    return done.stdout


def _blob_contents(project_dir: Path, blobs: set[str]) -> dict[str, bytes]:
    """Blob id -> content, by one `git cat-file --batch` (it answers `<id> <type> <size>LF<content>LF` each)."""
    order = sorted(blobs)
    out = _git(project_dir, "cat-file", "--batch", stdin="".join(f"{blob}\n" for blob in order).encode())
    found: dict[str, bytes] = {}
    position = 0
    for blob in order:
        header_end = out.index(b"\n", position)
        header = out[position:header_end].split()
        if len(header) != 3:
            raise Refused(f"git cat-file could not read blob {blob}: {b' '.join(header).decode(errors='replace')}")
        found[blob] = out[header_end + 1 : header_end + 1 + int(header[2])]
        position = header_end + 1 + int(header[2]) + 1
    return found


def find_revisions(digest: str, project_dir: Path) -> list[str]:
    """Every commit (any branch or tag, newest first) holding the program `digest`: `<hash> <date> <subject>`.

    A commit's digest is `digest_of` over the program files it holds, chosen by the `is_program_file` a
    checkout's digest uses; `git ls-tree` run in the project directory lists that directory only, relative to
    it (git-ls-tree(1): without --full-tree it is limited to the current directory), as `program_files` sees
    a checkout. Git checks blobs out byte for byte unless an eol or filter rule rewrites them (this repository
    sets none); `pulumi preview` in the checkout confirms it, as its gate refuses another program as a change.
    A symlink or submodule would differ from its checkout; the program has neither.
    """
    commits = _git(project_dir, "rev-list", "--all").decode().split()
    trees: dict[str, list[tuple[str, str]]] = {}
    for commit in commits:
        trees[commit] = []
        for entry in _git(project_dir, "ls-tree", "-r", "-z", commit).split(b"\0"):
            meta, _, path = entry.decode().partition("\t")
            if entry and meta.split()[1] == "blob" and is_program_file(path):
                trees[commit].append((path, meta.split()[2]))
    contents = _blob_contents(project_dir, {blob for entries in trees.values() for _, blob in entries})
    matches = [commit for commit in commits if digest_of((p, contents[b]) for p, b in trees[commit]) == digest]
    return [_git(project_dir, "log", "-1", "--format=%H %cs %s", commit).decode().strip() for commit in matches]


def print_revision(target: str, project_dir: Path, target_outputs_file: Path | None) -> int:
    """`--find-revision`: the commits holding the program TARGET runs, and how to run TARGET from one."""
    outputs = read_outputs(target, target_outputs_file, project_dir)
    if not has_deployed(outputs):
        missing = " or ".join(name for name in (RELEASE_OUTPUT, PROGRAM_DIGEST_OUTPUT) if not outputs.get(name))
        raise Refused(f"{target} has never finished a deployment (no {missing} output): it runs no revision")
    digest, here = str(outputs[PROGRAM_DIGEST_OUTPUT]), program_digest(project_dir)
    found = find_revisions(digest, project_dir)
    if not found:
        raise Refused(f"no commit here (git rev-list --all) holds the program {target} runs ({digest}); git fetch")
    print(f"{target} runs program {digest}, held by these commits, newest first:")
    print("".join(f"  {line}\n" for line in found), end="")
    print(f"This checkout is {'that program' if here == digest else 'another program: ' + here}.")
    print(f"Routine run: git worktree add ../{target}-running {found[0][:12]}; copy Pulumi.{target}.yaml there;")
    print(f"  in it, pulumi preview --stack {target} (the gate names any change), then pulumi up --stack {target}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the stack to promote into: rewrites Pulumi.<target>.yaml")
    parser.add_argument("--from", dest="source", help="the source stack (must be the target's promotion.from)")
    parser.add_argument("--source-outputs", type=Path, help="the source's `pulumi stack output --json`, from a file")
    parser.add_argument("--target-outputs", type=Path, help="the target's `pulumi stack output --json`, from a file")
    parser.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    parser.add_argument("--find-revision", action="store_true", help="name the commits of the program TARGET runs")
    parser.add_argument("--project-dir", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.find_revision:
            return print_revision(args.target, args.project_dir.resolve(), args.target_outputs)
        promotion = prepare(
            args.target,
            source=args.source,
            project_dir=args.project_dir.resolve(),
            source_outputs_file=args.source_outputs,
            target_outputs_file=args.target_outputs,
        )
    except Refused as refusal:
        print(f"promote: refused: {refusal}", file=sys.stderr)
        return 1
    target_file = f"Pulumi.{promotion.target}.yaml"
    if not promotion.changed and not promotion.removed:
        print(f"{target_file} already declares the release {promotion.source} runs; nothing to promote.")
        return 0
    print(f"# Promote {promotion.source} -> {promotion.target}: release keys in {target_file}")
    for path in promotion.removed:
        setting = ".".join((path[0].removeprefix(_PREFIX), *path[1:]))
        print(f"# removes {setting}: {promotion.source} runs without it")
    print(
        "".join(
            difflib.unified_diff(
                promotion.before.splitlines(keepends=True),
                promotion.after.splitlines(keepends=True),
                target_file,
                target_file,
            )
        ),
        end="",
    )
    print(f"\n# Offline plan of {promotion.target}, before -> after")
    print(promotion.plan_diff or "(no difference in the plan)\n", end="")
    if args.dry_run:
        print(f"\n--dry-run: {target_file} not written.")
        return 0
    write_text(args.project_dir.resolve() / target_file, promotion.after)
    print(
        f"\nwrote {target_file}. Next: pulumi preview --stack {promotion.target}; pulumi up --stack {promotion.target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
