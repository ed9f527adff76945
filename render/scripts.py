"""The one renderer for every shell script that runs on a node.

Every script gets the same prologue: strict mode, an error trap that names the
host and the step, and an idempotency guard evaluated before anything changes,
so re-running a step on a node where it already happened does nothing.
Values only ever enter a script through `quote`/`command`, never by pasting
unquoted text.

Secrets never appear in a script: they travel on the step's stdin as a *bundle*
(one file per line: ``<path> <octal mode> <base64 content>``) that
`INSTALL_BUNDLE` writes out with the declared modes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

LOG_DIR = "/var/log/kubeadm-ha"
STATE_DIR = "/var/lib/kubeadm-ha"

# What a bootstrap token looks like; used to scrub logs shown on failure.
TOKEN_PATTERN = r"[a-z0-9]{6}\.[a-z0-9]{16}"
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
# Step and host names appear in comments, messages and file names; keep them to one plain word.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def quote(value: object) -> str:
    return shlex.quote(str(value))


def command(*words: object) -> str:
    """A shell command line with every word quoted."""
    return " ".join(quote(word) for word in words)


@dataclass(frozen=True)
class Script:
    """A step to run on one host. `done_when` is a shell condition that is true once the step has happened."""

    step: str
    host: str
    done_when: str
    body: tuple[str, ...]
    functions: tuple[str, ...] = field(default=())
    # False for a script the machine running Pulumi runs about `host` (as an unprivileged user: it keeps
    # no logs or state of its own).
    on_node: bool = True
    # True for a step given secrets on stdin (components/remote.py sets it): what its body prints goes to a
    # private file, and a failure prints only a scrubbed summary. pulumi-command puts everything a failed
    # command printed into its error, whatever `logging` says (pulumi-command v1.2.1
    # provider/pkg/provider/remote/commandOutputs.go and local/commandOutputs.go, `run`:
    # `fmt.Errorf("%w: running %q:\n%s", err, cmd, stdouterrbuf.String())`), and that error reaches the
    # operator's terminal and the engine's logs.
    secret_stdin: bool = False

    def __post_init__(self) -> None:
        for what, value in (("step", self.step), ("host", self.host)):
            if not _SAFE_NAME.match(value):
                raise ValueError(f"script {what} {value!r} must be letters, digits, '.', '_' or '-'")

    def render(self) -> str:
        return render(self)


def render(script: Script) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# kubeadm-ha step {script.step} on {script.host}. Generated; do not edit.",
        "set -euo pipefail",
        "set -o errtrace",
        "umask 077",
        f"readonly KUBEADM_HA_STEP={quote(script.step)} KUBEADM_HA_HOST={quote(script.host)}",
        f"readonly KUBEADM_HA_LOG_DIR={quote(LOG_DIR)}"
        + (f" KUBEADM_HA_STATE_DIR={quote(STATE_DIR)}" if script.on_node else ""),
        "trap 'kubeadm_ha_failed $? $LINENO' ERR",
        "kubeadm_ha_failed() {",
        '  echo "kubeadm-ha: step ${KUBEADM_HA_STEP} failed on host ${KUBEADM_HA_HOST} (exit $1 at line $2)" >&2',
        '  exit "$1"',
        "}",
        *_LOGGED_FUNCTION,
        *_SCRUB_FUNCTION,
        *script.functions,
        # A guard is a condition: what its commands print is no one's business, and a secret step's would
        # reach the error unfiltered (its output file does not exist yet).
        f"if {{ {script.done_when}; }} >/dev/null 2>&1; then"
        if script.secret_stdin
        else f"if {script.done_when}; then",
        '  echo "kubeadm-ha: ${KUBEADM_HA_STEP} already done on ${KUBEADM_HA_HOST}; nothing to do"',
        "  exit 0",
        "fi",
        *(['mkdir -p "$KUBEADM_HA_LOG_DIR" "$KUBEADM_HA_STATE_DIR"'] if script.on_node else []),
        *(_quiet_body(script) if script.secret_stdin else script.body),
        'echo "kubeadm-ha: ${KUBEADM_HA_STEP} done on ${KUBEADM_HA_HOST}"',
    ]
    return "\n".join(lines) + "\n"


_TRAP = "trap 'kubeadm_ha_failed $? $LINENO' ERR"


def _quiet_body(script: Script) -> tuple[str, ...]:
    """The body of a secret-stdin step, its output kept in a private file; on failure a scrubbed summary.

    The body runs in a subshell writing to the file; `set -e` and the ERR trap are set again inside it
    (a subshell in an `if` or `||` would run with errexit ignored), and the parent's ERR trap is off
    while it runs, so the parent gets the status and reports it whatever way the body ended (an ERR,
    an explicit `exit 1`). Each run appends; the summary shows only this run's part.
    """
    if script.on_node:
        where = "on ${KUBEADM_HA_HOST}, readable by root only"
        output = ['kha_output="${KUBEADM_HA_LOG_DIR}/${KUBEADM_HA_STEP}.output.log"', ': >>"$kha_output"']
        keep = []
    else:
        where = "on the machine running Pulumi, readable by its user only"
        output = ['kha_output="$(mktemp -t "kubeadm-ha-${KUBEADM_HA_STEP}.XXXXXX")"']
        keep = ['rm -f "$kha_output" || true']  # kept only when the step failed
    report = (
        "kubeadm-ha: step ${KUBEADM_HA_STEP} failed on host ${KUBEADM_HA_HOST} (exit $kha_rc). It was given"
        f" secrets, so its output is kept in $kha_output ({where}). Its last lines, with private keys,"
        " bootstrap tokens and base64 runs of 40 or more characters redacted:"
    )
    return (
        *output,
        # wc, not GNU stat: the local reset runs on the operator's machine, which may be a Mac.
        'kha_from=$(( $(wc -c <"$kha_output") + 1 ))',
        "trap - ERR",
        "set +e",
        "(",
        "set -e",
        _TRAP,
        *script.body,
        ') >>"$kha_output" 2>&1',
        "kha_rc=$?",
        "set -e",
        _TRAP,
        'if [ "$kha_rc" -ne 0 ]; then',
        f'  echo "{report}" >&2',
        f'  tail -c "+$kha_from" "$kha_output" | kha_scrub | tail -n {TAIL_LINES} >&2',
        '  exit "$kha_rc"',
        "fi",
        *keep,
    )


TAIL_LINES = 25
# `kha_scrub` (a filter) redacts what a tool may echo of its secrets: private keys in PEM (a whole
# block, also one on a single line), bootstrap tokens, and any base64 run of 40 or more characters
# (a kubeconfig's key data, a bundle line, a 64-hex certificate key); public digests and certificates
# go too, which costs a diagnosis little. Scrubbing the whole text first means a key block cut by the
# tail is still recognised.
# `PRIVATE[ ]KEY`: the same match, but the script text never holds the words a key's armour holds, so
# "no key in the command string" stays a plain substring check (tests/program/test_program.py).
_PEM_BEGIN = "-----BEGIN [A-Z0-9 ]*PRIVATE[ ]KEY-----"
_PEM_END = "-----END [A-Z0-9 ]*PRIVATE[ ]KEY-----"
_SCRUB_RULES = (
    f"s/{_PEM_BEGIN}.*{_PEM_END}/<redacted-private-key>/g",
    f"/{_PEM_BEGIN}/,/{_PEM_END}/c\\<redacted-private-key>",
    f"s/{TOKEN_PATTERN}/<redacted-token>/g",
    "s#[A-Za-z0-9+/]{40,}={0,2}#<redacted-base64>#g",
)
_SCRUB_FUNCTION = (
    "kha_scrub() {",
    "  sed -E " + " ".join(f"-e {quote(rule)}" for rule in _SCRUB_RULES),
    "}",
)

# `logged NAME CMD...` keeps long tool output (kubeadm, apt) in a log file on the
# node; on failure it shows the log's tail scrubbed (`kha_scrub`), because kubeadm
# prints join commands and tokens.
_LOGGED_FUNCTION = (
    "logged() {",
    '  local log="${KUBEADM_HA_LOG_DIR}/$1.log"',
    "  shift",
    '  mkdir -p "$KUBEADM_HA_LOG_DIR"',
    "  local rc=0",
    '  "$@" >>"$log" 2>&1 || rc=$?',
    '  if [ "$rc" -ne 0 ]; then',
    '    echo "kubeadm-ha: $1 failed on ${KUBEADM_HA_HOST} during ${KUBEADM_HA_STEP}; last lines of ${log}:" >&2',
    f'    kha_scrub <"$log" | tail -n {TAIL_LINES} >&2',
    '    return "$rc"',
    "  fi",
    "}",
)


def logged(log_name: str, *words: object) -> str:
    return command("logged", log_name, *words)


# Reads a bundle from stdin and installs each file atomically with its mode.
# Paths are checked in Python before encoding; the shell re-checks that they
# are absolute and free of "..", because stdin is the one input it cannot see.
INSTALL_BUNDLE_FUNCTION = (
    "install_bundle() {",
    "  local path mode content tmp",
    "  while read -r path mode content; do",
    '    [ -n "$path" ] || continue',
    '    case "$path" in /*) ;; *) echo "kubeadm-ha: refusing relative path in bundle" >&2; return 1;; esac',
    '    case "$path" in *..*) echo "kubeadm-ha: refusing path with .. in bundle" >&2; return 1;; esac',
    '    mkdir -p "$(dirname "$path")"',
    '    tmp="$(mktemp "${path}.XXXXXX")"',
    '    printf \'%s\' "$content" | base64 -d >"$tmp"',
    '    chmod "$mode" "$tmp"',
    '    mv -f "$tmp" "$path"',
    "  done",
    "}",
)


@dataclass(frozen=True)
class BundleFile:
    path: str
    content: str
    mode: int = 0o600


def encode_bundle(files: Iterable[BundleFile]) -> str:
    """Serialise files for `install_bundle`; pure, so it may run inside `Output.apply`."""
    lines = []
    for item in files:
        if not _SAFE_PATH.match(item.path) or ".." in item.path:
            raise ValueError(f"unsafe bundle path {item.path!r}")
        encoded = base64.b64encode(item.content.encode()).decode()
        lines.append(f"{item.path} {item.mode:o} {encoded}")
    return "\n".join(lines) + "\n"


def write_file(path: str, content: str, mode: int = 0o644) -> tuple[str, ...]:
    """Shell lines that write public `content` to `path` atomically (for non-secret files only)."""
    if not _SAFE_PATH.match(path) or ".." in path:
        raise ValueError(f"unsafe path {path!r}")
    return (
        f"mkdir -p {quote(path.rsplit('/', 1)[0] or '/')}",
        f"printf '%s' {quote(content)} >{quote(path + '.kubeadm-ha.tmp')}",
        command("chmod", f"{mode:o}", path + ".kubeadm-ha.tmp"),
        command("mv", "-f", path + ".kubeadm-ha.tmp", path),
    )


def sha256_hex(text: str) -> str:
    """The digest `files_match` compares a file against."""
    return hashlib.sha256(text.encode()).hexdigest()


def files_match(expected: Mapping[str, str]) -> str:
    """A condition true when every file exists with exactly the given sha256 digest."""
    if not expected:
        return "true"
    checks = [f"{digest}  {path}" for path, digest in sorted(expected.items())]
    listing = "\n".join(checks) + "\n"
    return f"printf '%s' {quote(listing)} | sha256sum --check --status --strict 2>/dev/null"


def remote_command(script: Script) -> str:
    """The command string given to pulumi-command: the rendered script, run as root by bash."""
    return f"sudo --non-interactive bash -c {quote(script.render())} {quote('kubeadm-ha-' + script.step)}"


def bounded_wait_function(poll_seconds: float) -> tuple[str, ...]:
    """`kha_wait LIMIT WHAT CMD...`: run CMD every `poll_seconds` until it succeeds, or fail after LIMIT seconds
    naming WHAT and the host, so every wait in a step script is bounded the same way."""
    return (
        "kha_wait() {",
        '  local limit="$1" what="$2" deadline',
        "  shift 2",
        "  deadline=$((SECONDS + limit))",
        '  until "$@"; do',
        '    if [ "$SECONDS" -ge "$deadline" ]; then',
        '      echo "kubeadm-ha: gave up after ${limit}s waiting for ${what} on ${KUBEADM_HA_HOST}" >&2',
        "      return 1",
        "    fi",
        f"    sleep {poll_seconds}",
        "  done",
        "}",
    )


def retry_function(pause_seconds: int) -> tuple[str, ...]:
    """`kha_retry ATTEMPTS WHAT CMD...`: run CMD until it succeeds, at most ATTEMPTS times, `pause_seconds`
    apart; each failure is said on stderr, and the last fails naming WHAT and the host. For a call a loaded or
    restarting API server can drop (EOF) where the next attempt would succeed; CMD must be safe to repeat."""
    return (
        "kha_retry() {",
        '  local attempts="$1" what="$2" attempt=1',
        "  shift 2",
        '  until "$@"; do',
        '    if [ "$attempt" -ge "$attempts" ]; then',
        '      echo "kubeadm-ha: ${what} on ${KUBEADM_HA_HOST} failed ${attempts} times; giving up" >&2',
        "      return 1",
        "    fi",
        (
            '    echo "kubeadm-ha: ${what} on ${KUBEADM_HA_HOST} failed (attempt ${attempt} of ${attempts});'
            f' retrying in {pause_seconds} s" >&2'
        ),
        f"    sleep {pause_seconds}",
        "    attempt=$((attempt + 1))",
        "  done",
        "}",
    )


def https_fetch(max_seconds: int) -> tuple[str, ...]:
    """curl over HTTPS only, bounded per attempt (connect and total) and in the number of attempts."""
    return (
        "curl",
        "--fail",
        "--silent",
        "--show-error",
        "--location",
        "--proto",
        "=https",
        "--connect-timeout",
        "15",
        "--max-time",
        str(max_seconds),
        "--retry",
        "5",
        "--retry-delay",
        "5",
        "--retry-all-errors",
    )


def _refuse(message: str) -> str:
    """An `echo … >&2; exit 1` naming the host, for a check that failed before anything changed."""
    return f'echo "kubeadm-ha: on ${{KUBEADM_HA_HOST}}: "{quote(message)} >&2'


def download_verified(fetch: tuple[str, ...], url: str, path: str, sha256: str) -> tuple[str, ...]:
    """Shell lines that download `url` to `path` only if its SHA-256 is `sha256`.

    The file lands under a temporary name and is moved into place only once it matches, so a mismatch
    (a moved tag, a compromised mirror) stops the step with the host and the file named and changes
    nothing that was there before.
    """
    return _verified_into(path, sha256, url, lambda partial: command(*fetch, "--output", partial, url))


def copy_verified(source: str, path: str, sha256: str) -> tuple[str, ...]:
    """As `download_verified`, for a file already on the node (what an artifact bundle brought)."""
    return _verified_into(path, sha256, source, lambda partial: command("cp", source, partial))


def _verified_into(path: str, sha256: str, origin: str, fetch: Callable[[str], str]) -> tuple[str, ...]:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"{sha256!r} is not a lowercase hex SHA-256")
    partial = path + ".download"
    message = f"{origin} (for {path}) does not have the pinned SHA-256 {sha256}; nothing was changed"
    return (
        fetch(partial),
        f"if ! printf '%s  %s\\n' {quote(sha256)} {quote(partial)} | sha256sum --check --status --strict; then",
        f"  {command('rm', '-f', partial)}",
        f"  {_refuse(message)}",
        "  exit 1",
        "fi",
        command("mv", "-f", partial, path),
    )


_PRIMARY_FINGERPRINTS = '$1 == "pub" { p = 1; next } p && $1 == "fpr" { print $10; p = 0 }'


def download_signing_key(fetch: tuple[str, ...], url: str, path: str, fingerprint: str) -> tuple[str, ...]:
    """Shell lines that download an OpenPGP key to `path` only if its primary key has `fingerprint`.

    A key is pinned by fingerprint rather than by file digest: the publisher re-exports the same key
    with new expiry dates, which changes the file but not the fingerprint.
    """
    if not re.fullmatch(r"[0-9A-F]{40}", fingerprint):
        raise ValueError(f"{fingerprint!r} is not an uppercase hex OpenPGP v4 fingerprint")
    partial = path + ".download"
    message = f"{url} (for {path}) is not the key with the pinned fingerprint {fingerprint}; nothing was changed"
    show = command("gpg", "--batch", "--no-default-keyring", "--with-colons", "--show-keys", partial)
    return (
        command(*fetch, "--output", partial, url),
        # The `fpr` record after each `pub` is a primary key's (the others are subkeys'); a file holding
        # any further primary key prints two lines and is refused as well.
        f'found="$({show} 2>/dev/null | awk -F: {quote(_PRIMARY_FINGERPRINTS)})" || found=""',
        f'if [ "$found" != {quote(fingerprint)} ]; then',
        f"  {command('rm', '-f', partial)}",
        f"  {_refuse(message)}",
        "  exit 1",
        "fi",
        command("mv", "-f", partial, path),
    )
