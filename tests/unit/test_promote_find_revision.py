"""issue 18, defect 3: `tools.promote TARGET --find-revision` names the commits holding the program TARGET runs.

A stack's routine `pulumi up` passes its promotion gate when it re-applies the release and program it runs, so
an operator needs the git revision whose program has the stack's `programDigest`. Each test builds a real git
repository of its own (real `git`, nothing faked) and checks the commit it names against the digest of the
files as they were checked out; one more reads this repository's own history, read-only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from model.release import PROGRAM_DIGEST_OUTPUT, PROGRAM_DIRECTORIES, RELEASE_OUTPUT, program_digest
from tools import promote
from tools.promote import Refused, find_revisions

ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT = 60


def git(repo: Path, *args: str, date: str = "2026-01-01T00:00:00Z") -> str:
    # A private identity and no global or system config: the test must not depend on (or touch) the user's.
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    env |= {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.test", *args]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT, check=True)
    return done.stdout.strip()


def copy_program(destination: Path) -> None:
    destination.mkdir(parents=True)
    for name in ("__main__.py", "Pulumi.yaml", "requirements.txt"):
        shutil.copy2(ROOT / name, destination / name)
    for directory in PROGRAM_DIRECTORIES:
        shutil.copytree(ROOT / directory, destination / directory, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A repository whose project lives in `infra/`: three commits, name -> (hash, program digest then)."""
    repo, project = tmp_path / "repo", tmp_path / "repo" / "infra"
    copy_program(project)
    (project / "Pulumi.prod.yaml").write_text("config:\n  kubeadm-ha:workers: {replicas: 1}\n")
    (repo / "README.md").write_text("outside the project\n")
    git(repo, "init", "-q")
    commits: dict[str, tuple[str, str]] = {}

    def commit(name: str, day: int) -> None:
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", name, date=f"2026-01-0{day}T00:00:00Z")
        commits[name] = (git(repo, "rev-parse", "HEAD"), program_digest(project))

    commit("first", 1)
    versions = project / "model" / "versions.py"
    versions.write_text(versions.read_text() + "# a change to the program\n")
    commit("second", 2)
    # Not the program: a stack file, a tool, a file outside the project. The program stays the second's.
    (project / "Pulumi.prod.yaml").write_text("config:\n  kubeadm-ha:workers: {replicas: 3}\n")
    (project / "tools").mkdir()
    (project / "tools" / "extra.py").write_text("X = 1\n")
    (repo / "README.md").write_text("changed\n")
    commit("third", 3)
    return project, commits


def test_each_commit_is_found_by_the_digest_its_checkout_had(history: tuple[Path, dict[str, tuple[str, str]]]) -> None:
    project, commits = history
    first, second, third = commits["first"], commits["second"], commits["third"]
    assert first[1] != second[1] == third[1]
    # A bytecode cache in the checkout is not the program either.
    (project / "model" / "__pycache__").mkdir(exist_ok=True)
    (project / "model" / "__pycache__" / "release.cpython-311.pyc").write_bytes(b"\0")
    assert [line.split()[0] for line in find_revisions(first[1], project)] == [first[0]]
    found = find_revisions(second[1], project)
    assert [line.split()[0] for line in found] == [third[0], second[0]]  # newest first
    assert found[0].split(maxsplit=2)[1:] == ["2026-01-03", "third"]
    assert find_revisions("sha256:" + "0" * 64, project) == []


def test_the_command_names_the_revision_a_stack_runs(
    history: tuple[Path, dict[str, tuple[str, str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, commits = history
    outputs = tmp_path / "prod.json"
    outputs.write_text(json.dumps({RELEASE_OUTPUT: {"cni": "calico"}, PROGRAM_DIGEST_OUTPUT: commits["first"][1]}))
    args = ["prod", "--find-revision", "--target-outputs", str(outputs), "--project-dir", str(project)]
    assert promote.main(args) == 0
    out = capsys.readouterr().out
    assert f"prod runs program {commits['first'][1]}" in out and f"  {commits['first'][0]} 2026-01-01 first" in out
    assert f"This checkout is another program: {commits['third'][1]}" in out
    assert f"git worktree add ../prod-running {commits['first'][0][:12]}" in out
    # From the commit prod runs, the checkout is that program.
    git(project.parent, "checkout", "-q", commits["first"][0])
    assert promote.main(args) == 0 and "This checkout is that program." in capsys.readouterr().out

    outputs.write_text(json.dumps({RELEASE_OUTPUT: {}, PROGRAM_DIGEST_OUTPUT: "sha256:" + "0" * 64}))
    assert promote.main(args) == 1
    assert "no commit here (git rev-list --all) holds the program prod runs" in capsys.readouterr().err
    outputs.write_text(json.dumps({"kubeconfig": "[secret]"}))
    assert promote.main(args) == 1
    assert "prod has never finished a deployment (no release or programDigest output)" in capsys.readouterr().err
    outputs.write_text(json.dumps({PROGRAM_DIGEST_OUTPUT: "sha256:" + "0" * 64}))
    assert promote.main(args) == 1
    assert "(no release output)" in capsys.readouterr().err  # it named programDigest before


def test_outside_a_git_repository_the_command_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "not-git"
    copy_program(project)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above this one
    with pytest.raises(Refused, match=r"`git rev-list --all` failed in .*not a git repository"):
        find_revisions(program_digest(project), project)


def test_this_repositorys_head_is_found_by_the_digest_of_its_files(tmp_path: Path) -> None:
    """Read-only on this repository: `git archive HEAD` is exactly what a checkout of HEAD holds."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT)
    if head.returncode != 0:
        pytest.skip("not run from a git checkout")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, timeout=GIT_TIMEOUT, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path / "head", filter="data")
    found = [line.split()[0] for line in find_revisions(program_digest(tmp_path / "head"), ROOT)]
    assert head.stdout.strip() in found
