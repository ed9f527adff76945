"""Issue 18, defect 8: a step given secrets on stdin prints none of them, at whatever point it fails.

Why this matters: pulumi-command v1.2.1 builds a failed command's error from the command string and
everything it printed, whatever `logging` says (provider/pkg/provider/remote/commandOutputs.go, `run`:
`fmt.Errorf("%w: running %q:\\n%s", err, cmd, stdouterrbuf.String())`, where `stdouterrbuf` gets stdout
and stderr unconditionally; local/commandOutputs.go `run` likewise). That error reaches the operator's
terminal and the engine's logs. A delete gets the stored stdin too (remote/commandController.go `Delete`
runs `props.run` with the state's inputs; local/commandController.go `Delete` passes `props.BaseInputs`).

What runs: every secret-stdin step of the real program (`__main__.py` under the offline runtime, for
every stack file), each script exactly as the step sends it (its `create` or `delete` string), with the
real stdin bundle the step would send, under real bash in the mount-namespace sandbox (tests/sandbox.py).
Every external program the script calls is a stub first on PATH that counts its call; run N makes the
Nth call fail (exit 42), for every N up to the number of calls of a clean run, so the step fails at each
of its stages in turn.

* Tools (kubeadm, kubectl, etcdctl, curl, ssh) are a stand-in for the worst tool: on every call they
  print to stderr everything they were given (arguments, the content of every file named in them, what
  is left on their stdin), and on the failing call the same again on stdout. kubeadm and kubectl really
  do echo tokens and configs at higher verbosity; the script must not rely on them being quiet.
* Utilities (coreutils, sed, awk, flock, ...) run the real program, except the failing call, which
  prints what GNU tools print on failure: their name and arguments.

What is checked: stdout+stderr of every run (what pulumi-command puts in the error) and the command
string hold none of the secrets: each private file of the bundle (mode without group/other bits), its
base64 form (what the bundle carries), each line of a PEM private key and the key's base64 (what a
kubeconfig's `client-key-data` holds), every bootstrap token and its secret half, and the node's own
secrets a tool could read (admin.conf with its client key, the etcd healthcheck key).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pwd
import re
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from components.pki import APISERVER_ETCD_CLIENT, SA_KEY_PATH, SHARED_CAS
from components.remote import as_sent
from render.admin_node import Target, join_token_script
from tests.program.test_external_etcd import members, scaled
from tests.sandbox import Sandbox, Stub
from tools.offline import UNKNOWN, Evaluation, Registration, evaluate
from tools.plan import bundle_by_path, script_of

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("dev", "staging", "prod")
TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\n.*?-----END [A-Z0-9 ]*PRIVATE KEY-----\n?", re.S)
# Each kind of secret-stdin step, by the suffix of its resource name.
LOCAL_HOME = pwd.getpwuid(os.getuid()).pw_dir
KINDS = ("place-pki", "kubeadm-init", "kubeadm-join", "join-token", "etcd-member", "reset", "host-key-disk")
KINDS += ("encryption-add", "encryption-promote", "encryption-drop")

# ---------------------------------------------------------------- stubs

TOOLS = ("kubeadm", "kubectl", "etcdctl", "curl", "ssh")
UTILITIES = (
    *("awk", "base64", "cat", "chmod", "cmp", "cut", "date", "dirname", "flock", "install", "mkdir", "mktemp"),
    *("mv", "paste", "pgrep", "rm", "sed", "seq", "sha256sum", "sleep", "stat", "tail", "timeout", "touch"),
)

# Counts the call (a lock: stubs in one pipeline run at once); `failing` is set on the FAIL_AT-th call.
_COUNT = r"""
exec 8>>"$STATE/counter.lock"
@FLOCK@ 8
n=$(( $(@CAT@ "$STATE/counter" 2>/dev/null || echo 0) + 1 ))
printf '%s\n' "$n" >"$STATE/counter"
exec 8>&-
{ printf '%s' "$n"; printf ' %q' "$name" "$@"; printf '\n'; } >>"$STATE/counted"
failing=no
[ "$n" = "${FAIL_AT:-0}" ] && failing=yes
"""

_TOOL = r"""
given() {
  printf '%s was given:' "$name"; printf ' %q' "$@"; printf '\n'
  local arg file
  for arg in "$@"; do
    for file in "$arg" "${arg#*=}"; do
      if [ -f "$file" ] && [ -r "$file" ]; then printf -- '--- %s\n' "$file"; @CAT@ -- "$file"; fi
    done
  done
  if [ ! -t 0 ]; then printf -- '--- stdin\n'; @CAT@; fi
}
given "$@" >"$STATE/given.$$" 2>&1 || true
@CAT@ "$STATE/given.$$" >&2
if [ "$failing" = yes ]; then @CAT@ "$STATE/given.$$"; @RM@ -f "$STATE/given.$$"; exit 42; fi
@RM@ -f "$STATE/given.$$"
# What a call that succeeds prints on stdout: member lists for the scripts that read them, else nothing.
case " $* " in
  *" member list "*) @CAT@ "$STATE/members" 2>/dev/null || true ;;
esac
"""

_UTILITY = r"""
if [ "$failing" = yes ]; then echo "$name: injected failure: $*" >&2; exit 42; fi
# `timeout N bash -c '</dev/tcp/ADDRESS/PORT'` is a port probe: the scenario says which ports answer.
if [ "$name" = timeout ] && [ "${2-}" = bash ] && [ "${3-}" = -c ] && [[ "${4-}" == "</dev/tcp/"* ]]; then
  port="${4##*/}"
  grep -qxF "$port" "$STATE/open-ports" 2>/dev/null && exit 0
  exit 1
fi
exec @REAL@ "$@"
"""


def _real(program: str) -> str:
    found = shutil.which(program)
    assert found is not None, f"{program} is not installed"
    return found


def _stubs() -> dict[str, str | Stub]:
    def fill(snippet: str, **extra: str) -> str:
        text = (_COUNT + snippet).replace("@FLOCK@", _real("flock")).replace("@CAT@", _real("cat"))
        text = text.replace("@RM@", _real("rm"))
        for key, value in extra.items():
            text = text.replace(f"@{key}@", value)
        return text

    stubs: dict[str, str | Stub] = {tool: fill(_TOOL) for tool in TOOLS}
    stubs.update({utility: fill(_UTILITY, REAL=_real(utility)) for utility in UTILITIES})
    return stubs


# ---------------------------------------------------------------- the node's own secrets

FAKE_ADMIN_KEY = (
    "-----BEGIN EC PRIVATE KEY-----\n"
    "MHcCAQEEIAdminKeyOnTheNodeDefect8LeakCanaryQQQQQQQQQQQQQQQQQoAoGCCqGSM49\n"
    "AwEHoUQDQgAEadminCanaryXYZadminCanaryXYZadminCanaryXYZadminCanaryXYZadm\n"
    "inCanaryXYZadminCanaryXYZ==\n"
    "-----END EC PRIVATE KEY-----\n"
)
ADMIN_CONF = f"""\
apiVersion: v1
kind: Config
users:
- name: kubernetes-admin
  user:
    client-certificate-data: {base64.b64encode(b"public certificate").decode()}
    client-key-data: {base64.b64encode(FAKE_ADMIN_KEY.encode()).decode()}
"""
FAKE_HEALTHCHECK_KEY = FAKE_ADMIN_KEY.replace("Admin", "Hlthc").replace("admin", "hlthc")
NODE_SECRETS = {
    "/etc/kubernetes/admin.conf": ADMIN_CONF,
    "/etc/kubernetes/pki/etcd/healthcheck-client.key": FAKE_HEALTHCHECK_KEY,
}
# What the place-pki step put on a control plane before its kubeadm step runs (the kubeadm steps check for them).
PLACED_KEYS = {
    path: FAKE_ADMIN_KEY.replace("Admin", f"Pki{number:02d}")
    for number, path in enumerate((*(ca.key_path for ca in SHARED_CAS), SA_KEY_PATH, APISERVER_ETCD_CLIENT.key_path))
}


# ---------------------------------------------------------------- what must not be printed


def needles(secret_text: str, label: str) -> dict[str, str]:
    """Every form of `secret_text` a leak could take, each with a label that names it without showing it."""
    found = {
        f"{label} (whole)": secret_text.strip(),
        f"{label} (base64)": base64.b64encode(secret_text.encode()).decode(),
    }
    for index, key in enumerate(PEM_KEY.findall(secret_text)):
        found[f"{label} key {index} (base64)"] = base64.b64encode(key.encode()).decode()
        for number, line in enumerate(key.splitlines()[1:-1]):
            if len(line) >= 16:
                found[f"{label} key {index} line {number}"] = line
    for token in TOKEN.findall(secret_text):
        found[f"{label} token"] = token
        found[f"{label} token secret"] = token.split(".", 1)[1]
    return found


def stdin_needles(stdin: str) -> dict[str, str]:
    if stdin.startswith("-----BEGIN"):  # a bare key (the operator's, for `ssh`)
        return needles(stdin, "stdin key")
    found: dict[str, str] = {}
    for path, (mode, content) in bundle_by_path(stdin).items():
        if mode & 0o077 == 0:
            found.update(needles(content, path))
    return found


def node_needles() -> dict[str, str]:
    found: dict[str, str] = {}
    for path, content in {**NODE_SECRETS, **PLACED_KEYS}.items():
        found.update(needles(content, f"node {path}"))
    return {**found, **needles(FAKE_ADMIN_KEY, "node admin.conf client key")}


def leaks(text: str, forms: dict[str, str]) -> list[str]:
    return sorted(label for label, needle in forms.items() if needle and needle in text)


# ---------------------------------------------------------------- the program's secret-stdin steps


@cache
def evaluated(stack: str) -> Evaluation:
    if stack == "prod-scaled":  # prod's three etcd members running, two more added
        return scaled(5, members(3), members(3))
    return evaluate(stack, project_dir=ROOT)


def secret_stdin_steps(ev: Evaluation) -> Iterator[tuple[Registration, str]]:
    for step in [*ev.by_type("command:remote:Command"), *ev.by_type("command:local:Command")]:
        if "stdin" in step.secret_inputs:
            for field in ("create", "update", "delete"):
                if step.inputs.get(field):
                    yield step, field


def kind_of(step: Registration) -> str | None:
    return next((kind for kind in KINDS if step.name.endswith(f"-{kind}")), None)


def test_every_secret_stdin_step_is_one_of_the_kinds_run_here():
    """A new secret-stdin step must get its scenarios below before it can land."""
    seen = set()
    for stack in STACKS:
        for step, field in secret_stdin_steps(evaluated(stack)):
            assert kind_of(step) is not None, f"{stack}: {step.name} ({field}) takes secrets on stdin; add it here"
            seen.add((kind_of(step), field))
    assert {(scenario.kind, scenario.field) for scenario in SCENARIOS} == seen


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One secret-stdin step of a stack, run as sent; the other fields say what the node and the world look like."""

    stack: str
    kind: str
    field: str
    variant: str = "plain"
    open_ports: tuple[str, ...] = ()
    always_failing: str = ""  # a tool that fails on every call (it takes the script down another branch)
    members: bool = False  # etcd lists this member and a peer (a removal has someone to ask)
    old_manifest: bool = False  # a running etcd member with another manifest (the restart path)
    refuses: bool = False  # the step refuses even when nothing fails
    name: str = ""  # which step of the kind (the first one otherwise)

    @property
    def id(self) -> str:
        return f"{self.stack}-{self.kind}-{self.field}-{self.variant}"


SCENARIOS = (
    Scenario("staging", "place-pki", "create"),
    Scenario("prod", "place-pki", "create", "external-etcd"),
    Scenario("staging", "kubeadm-init", "create", "join-running-cluster"),
    Scenario("staging", "kubeadm-init", "create", "init", always_failing="curl"),
    Scenario("staging", "kubeadm-init", "create", "refuse", open_ports=("2379",), always_failing="curl", refuses=True),
    Scenario("dev", "kubeadm-init", "create", "alone", always_failing="curl"),
    Scenario("staging", "kubeadm-join", "create"),
    Scenario("staging", "join-token", "create"),
    Scenario("staging", "join-token", "delete", "stacked-etcd", members=True),
    Scenario("prod", "join-token", "delete", "external-etcd"),
    Scenario("prod", "etcd-member", "create", "bootstrap"),
    Scenario("prod", "etcd-member", "create", "restart", old_manifest=True),
    Scenario("prod-scaled", "etcd-member", "create", "added", name="prod-etcd-4-etcd-member"),
    Scenario("prod", "etcd-member", "delete", members=True, old_manifest=True),
    Scenario("staging", "reset", "delete", open_ports=("22",)),
    Scenario("dev", "host-key-disk", "create"),
    Scenario("staging", "encryption-add", "create"),
    Scenario("staging", "encryption-promote", "create"),
    Scenario("staging", "encryption-drop", "create"),
)


def pick(scenario: Scenario) -> Registration:
    ev = evaluated(scenario.stack)
    steps = [
        step for step, field in secret_stdin_steps(ev) if field == scenario.field and kind_of(step) == scenario.kind
    ]
    assert steps, scenario
    if scenario.name:
        return next(step for step in steps if step.name == scenario.name)
    # The join-token delete that removes a control plane (with stacked etcd, also its member).
    control_planes = [step for step in steps if "-cp-" in step.name and not step.name.endswith("cp-1-join-token")]
    return (control_planes or steps)[0]


@dataclasses.dataclass(frozen=True)
class Run:
    rc: int
    output: str


class Harness:
    """Runs one script with its stdin in a fresh sandbox per run, the Nth counted call failing."""

    def __init__(self, base: Path, scenario: Scenario, script: str, stdin: str):
        self.base, self.scenario, self.script, self.stdin = base, scenario, script, stdin
        header = re.search(r"^# kubeadm-ha step (\S+) on (\S+)\. Generated", script, re.M)
        assert header is not None
        self.step, self.host = header.group(1), header.group(2)
        self.runs = 0

    def run(self, fail_at: int) -> tuple[Run, int]:
        """One run with the `fail_at`-th call failing (0: none); the result and the number of calls made."""
        self.runs += 1
        sandbox = Sandbox(self.base / f"run-{self.runs}", _stubs())
        for path, content in NODE_SECRETS.items():
            sandbox.put(path, content)
        if self.scenario.kind.startswith("kubeadm-"):
            for path, content in PLACED_KEYS.items():
                sandbox.put(path, content)
        if self.scenario.open_ports:
            sandbox.put_state("open-ports", "".join(f"{port}\n" for port in self.scenario.open_ports))
        if self.scenario.members:
            sandbox.put_state("members", _member_list(self.host))
        if self.scenario.old_manifest:
            sandbox.put("/etc/kubernetes/manifests/etcd.yaml", "an older manifest\n")
        (sandbox.root / "tmp").mkdir()
        env = {"FAIL_AT": str(fail_at), "TMPDIR": str(sandbox.root / "tmp")}
        if self.scenario.always_failing:
            env["STUB_FAIL"] = self.scenario.always_failing
        # A local step writes under the home of whoever runs Pulumi (the key disk's file): here, the sandbox's.
        script = self.script.replace(LOCAL_HOME + "/", f"{sandbox.root}/home/")
        result = sandbox.run(script, stdin=self.stdin, env=env)
        counter = sandbox.state / "counter"
        calls = int(counter.read_text()) if counter.exists() else 0
        return Run(result.returncode, result.stdout + result.stderr), calls

    def every_failure(self) -> Iterator[tuple[str, Run]]:
        """A run failing at each call site of a clean run: the first call of each program with its
        arguments, paths aside (a loop over the bundle's files is one site, each of its commands a stage)."""
        clean, calls = self.run(0)
        assert (clean.rc != 0) == self.scenario.refuses, f"{self.scenario.id}: clean run:\n{clean.output[-3000:]}"
        assert calls > 0
        if self.scenario.refuses:
            yield "no call", clean
        sites: dict[str, int] = {}
        for line in (self.base / f"run-{self.runs}" / "state" / "counted").read_text().splitlines():
            number, call = line.split(" ", 1)
            sites.setdefault(re.sub(r"\S*/\S*", "PATH", call), int(number))
        for site, fail_at in sorted(sites.items(), key=lambda item: item[1]):
            yield f"call {fail_at} ({site.split(' ', 1)[0]})", self.run(fail_at)[0]


def _member_list(host: str) -> str:
    # `etcdctl member list` (simple): ID, status, name, peer URLs, client URLs, learner.
    return (
        f"8e9e05c52164694d, started, {host}, https://127.66.0.1:2380, https://127.66.0.1:2379, false\n"
        "91bc3c398fb3c146, started, a-peer, https://127.66.0.2:2380, https://127.66.0.2:2379, false\n"
    )


def _scrubbed(text: str, forms: dict[str, str]) -> str:
    """`text` safe to show in a failure message: every needle replaced by its label."""
    for label, needle in sorted(forms.items(), key=lambda item: -len(item[1])):
        text = text.replace(needle, f"<{label}>")
    return text[-3000:]


def check(harness: Harness, forms: dict[str, str]) -> tuple[list[str], list[str]]:
    """Every failing run's leaks, and its failures that do not say which step failed where."""
    leaked, unnamed = [], []
    failed = 0
    for where, run in harness.every_failure():
        found = leaks(run.output, forms)
        if found:
            leaked.append(f"{where}: printed {', '.join(found)}")
        if run.rc != 0:
            failed += 1
            summary = f"kubeadm-ha: step {harness.step} failed on host {harness.host} (exit {run.rc}"
            if summary not in run.output:
                unnamed.append(f"{where}: no summary line; printed:\n{_scrubbed(run.output, forms)}")
    assert failed > 0, f"{harness.scenario.id}: no injected failure failed the step"
    return leaked, unnamed


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.id)
def test_a_failing_secret_stdin_step_prints_no_secret(sandbox_support: None, tmp_path: Path, scenario: Scenario):
    step = pick(scenario)
    stdin = step.inputs["stdin"]
    assert stdin is not UNKNOWN and isinstance(stdin, str)
    forms = {**stdin_needles(stdin), **node_needles()}
    assert forms, "the stdin holds no secret: the scenario checks nothing"
    sent = step.inputs[scenario.field]
    assert not leaks(sent, forms), f"{step.name}: the command string itself holds {leaks(sent, forms)}"
    harness = Harness(tmp_path, scenario, script_of(step, scenario.field), stdin)
    leaked, unnamed = check(harness, forms)
    assert not leaked, f"{step.name} ({scenario.field}), {harness.runs} runs:\n" + "\n".join(leaked[:12])
    assert not unnamed, f"{step.name} ({scenario.field}):\n" + "\n".join(unnamed[:3])


# ---------------------------------------------------------------- the check can fail

SCRUB_BASE64 = "-e 's#[A-Za-z0-9+/]{40,}={0,2}#<redacted-base64>#g'"


def _join_token_case(tmp_path: Path, name: str, script: str) -> list[str]:
    scenario = Scenario("staging", "join-token", "create")
    step = pick(scenario)
    forms = {**stdin_needles(step.inputs["stdin"]), **node_needles()}
    leaked, _ = check(Harness(tmp_path / name, scenario, script, step.inputs["stdin"]), forms)
    return leaked


def test_the_check_catches_a_step_that_prints_what_its_tools_print(sandbox_support: None, tmp_path: Path):
    """The join-token step as every secret step was before the fix (its output not kept aside) is caught."""
    sent = script_of(pick(Scenario("staging", "join-token", "create")))
    header = re.search(r"^# kubeadm-ha step join-token-for-(\S+) on (\S+)\.", sent, re.M)
    identifier = re.search(r"^if \{ token_fresh (\S+); \}", sent, re.M)
    assert header is not None and identifier is not None
    script = join_token_script(Target(admin=header.group(2), node=header.group(1)), identifier.group(1))
    assert as_sent(script, True).render() == sent  # the very step, rendered as sent ...
    leaked = _join_token_case(tmp_path, "plain", as_sent(script, False).render())  # ... and as before the fix
    assert any("admin.conf client key" in problem for problem in leaked), leaked


def test_the_check_catches_a_scrubber_that_misses_base64(sandbox_support: None, tmp_path: Path):
    """The quiet step with the base64 rule taken out of `kha_scrub` shows admin.conf's key data, and is caught."""
    sent = script_of(pick(Scenario("staging", "join-token", "create")))
    assert SCRUB_BASE64 in sent
    leaked = _join_token_case(tmp_path, "weak", sent.replace(SCRUB_BASE64, ""))
    assert any("admin.conf client key (base64)" in problem for problem in leaked), leaked
