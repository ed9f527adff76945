"""The engine lab's stack: the program run by the real Pulumi CLI, language host and provider plugins.

A copy of the program (Pulumi.yaml, __main__.py, components/, render/, model/) in a temporary directory, its
runtime pointed at this checkout's virtualenv, a file backend and a PULUMI_HOME of its own. The plugins are
installed there from local files (`pulumi plugin install resource NAME VERSION --file PATH`) under the version
each Python SDK asks the engine for, and PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=true turns any attempt to
download one into an error. Every command runs in the lab's network namespace (where the guests are), is
bounded, and its whole output is kept in a log file of the lab directory, not printed: the state carries keys.
Every `up`, `preview`, `refresh` and `destroy` also writes the engine's event log (`--event-log FILE`) into the
lab directory, and every run's console is kept on its `Run`, so the secrets check (secrets_scan.py) can search
them all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.real.engine import cli, toolchain
from tests.real.engine.toolchain import ROOT

PASSPHRASE = "engine-lab-passphrase"
PROGRAM = ("Pulumi.yaml", "__main__.py", "components", "render", "model")
# The Python SDK packages whose plugin the program needs, by plugin name.
SDKS = {"command": "pulumi_command", "tls": "pulumi_tls", "libvirt": "pulumi_libvirt"}
# The commands that take `--event-log FILE` (the engine's operations).
ENGINE_OPERATIONS = ("up", "preview", "refresh", "destroy")


def toolchain_binary(name: str) -> Path:
    """The one place the lab finds a toolchain binary (CLI, language host and its -exec, provider plugins): what
    tests/real/build-binaries built into its cache (the paired CLI and language host side by side), or the
    directory KUBEADM_HA_PULUMI_TOOLCHAIN names (e.g. the output of ../shared/third_party/build.sh)."""
    given = os.environ.get("KUBEADM_HA_PULUMI_TOOLCHAIN")
    if given:
        path = Path(given) / name
    elif name == toolchain.LANGUAGE_HOST_EXEC:
        path = toolchain.cached("pulumi-language-python").parent / name
    else:
        path = toolchain.cached(name)
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it with tests/real/build-binaries", pytrace=False)
    return path


def sdk_plugin_version(plugin: str) -> str:
    """The version the installed SDK asks the engine for (its pulumi-plugin.json), i.e. requirements.txt's pin."""
    metadata = json.loads(files(SDKS[plugin]).joinpath("pulumi-plugin.json").read_text())
    return str(metadata["version"])


def json_documents(text: str) -> list[dict[str, Any]]:
    """`pulumi up --json` prints the preview's document and then the update's."""
    decoder = json.JSONDecoder()
    documents: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        documents.append(document)


@dataclass
class Run(cli.Run):
    """A command's run (cli.Run), with what the lab's checks read from it: when it began, its engine events."""

    started: float  # time.time()
    secret: bool = False  # a run that prints secrets by design (`--show-secrets`): not part of the console check
    event_log: Path | None = None

    def documents(self) -> list[dict[str, Any]]:
        return json_documents(self.stdout)

    def events(self) -> list[dict[str, Any]]:
        """`up`, `refresh` and `destroy` with --json print the preview's document, then one engine event a line."""
        return [document for document in self.documents() if "sequence" in document]

    def logged_events(self) -> list[dict[str, Any]]:
        """The engine's event log (`--event-log`): one event a line, as `up --json` prints them."""
        if self.event_log is None or not self.event_log.is_file():
            return []
        return [json.loads(line) for line in self.event_log.read_text().splitlines() if line.strip()]

    def steps(self) -> dict[str, str]:
        """urn -> op: of the engine's events (the operation), or of the preview's document.

        The event log comes first: `pulumi preview --json` leaves `same` steps out of its document (measured,
        CLI v3.259.0: 1 `same` step of 59), while the event log has a `resourcePreEvent` for every resource."""
        events = self.logged_events() or self.events()
        if events:
            return {
                event["resourcePreEvent"]["metadata"]["urn"]: event["resourcePreEvent"]["metadata"]["op"]
                for event in events
                if "resourcePreEvent" in event
            }
        return {step["urn"]: step["op"] for step in self.documents()[-1].get("steps", [])}

    def step_times(self) -> dict[str, tuple[float, float]]:
        """urn -> (started, finished) in seconds since the epoch, from the engine's events."""
        started: dict[str, float] = {}
        times: dict[str, tuple[float, float]] = {}
        for event in self.events():
            for kind in ("resourcePreEvent", "resOutputsEvent", "resOpFailedEvent"):
                if kind in event:
                    urn = event[kind]["metadata"]["urn"]
                    if kind == "resourcePreEvent":
                        started[urn] = float(event["timestamp"])
                    elif urn in started:
                        times[urn] = (started[urn], float(event["timestamp"]))
        return times

    def errors(self) -> str:
        found = [
            str(event["diagnosticEvent"].get("message", ""))
            for event in self.events()
            if "diagnosticEvent" in event and event["diagnosticEvent"].get("severity") == "error"
        ]
        found += [
            str(diagnostic.get("message", ""))
            for document in self.documents()
            for diagnostic in document.get("diagnostics", [])
            if diagnostic.get("severity") == "error"
        ]
        return "\n".join(found) or self.stderr

    def describe(self) -> str:
        # stderr only: stdout may be a secret (`secret`), and pulumi.log writes it apart (masked when secret).
        return f"$ {' '.join(self.argv)}  (exit {self.returncode}, {self.seconds:.1f} s)\n{self.stderr[-4000:]}"


@dataclass
class LabStack:
    base: Path
    stack: str
    prefix: list[str]  # runs each command in the lab's network namespace
    runs: list[Run] = field(default_factory=list)

    @property
    def project(self) -> Path:
        return self.base / "project"

    @property
    def bin(self) -> Path:
        return self.base / "bin"

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.pathsep.join([str(self.bin), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
            "HOME": str(self.base / "home"),
            "LANG": "C.UTF-8",
            "PULUMI_HOME": str(self.base / "pulumi-home"),
            "PULUMI_BACKEND_URL": f"file://{self.base / 'state'}",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            # `--event-log` exists only with the debug commands on (pkg/v3 cmd/pulumi/operations/preview.go, up.go,
            # refresh.go, destroy.go: `if env.DebugCommands.Value()`); without it the CLI says "unknown flag".
            "PULUMI_DEBUG_COMMANDS": "true",
        }

    def _tools(self, plugins: tuple[str, ...]) -> None:
        for directory in ("home", "pulumi-home", "state", "bin", "project"):
            (self.base / directory).mkdir(parents=True, exist_ok=True)
        for name in ("pulumi", "pulumi-language-python", "pulumi-language-python-exec"):
            shutil.copy2(toolchain_binary(name), self.bin / name)
        for plugin in plugins:
            binary = toolchain_binary(f"pulumi-resource-{plugin}")
            version = sdk_plugin_version(plugin)
            installed = self.pulumi("plugin", "install", "resource", plugin, version, "--file", str(binary))
            assert installed.returncode == 0, installed.describe()

    def _init(self) -> None:
        created = self.pulumi("stack", "init", self.stack)
        assert created.returncode == 0, created.describe()

    def setup(self, config: dict[str, Any]) -> LabStack:
        """The program itself, with `config` as its stack file."""
        self._tools(tuple(SDKS))
        for name in PROGRAM:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, self.project / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, self.project / name)
        project = yaml.safe_load((self.project / "Pulumi.yaml").read_text())
        # This checkout's virtualenv (the SDKs of requirements.txt); the backend comes from PULUMI_BACKEND_URL.
        project["runtime"] = {"name": "python", "options": {"virtualenv": sys.prefix}}
        project.pop("backend", None)
        (self.project / "Pulumi.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
        self._init()
        stack_file = self.project / f"Pulumi.{self.stack}.yaml"
        if not stack_file.is_file():
            stack_file.write_text("{}\n")
        self.set_config(config)
        return self

    def setup_program(self, sources: dict[str, str], plugins: tuple[str, ...]) -> LabStack:
        """A small program of the test's own (`main.py` among `sources`), with only `plugins`."""
        self._tools(plugins)
        runtime = {"name": "python", "options": {"virtualenv": sys.prefix}}
        project = {"name": self.stack, "runtime": runtime, "main": "main.py"}
        (self.project / "Pulumi.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
        for name, text in sources.items():
            (self.project / name).write_text(text)
        self._init()
        return self

    def pulumi(
        self, *args: str, timeout: float = 300, secret_stdout: bool = False, env: Mapping[str, str] | None = None
    ) -> Run:
        argv = ["pulumi", *args, "--non-interactive"]
        if args[0] not in ("plugin", "stack"):
            argv += ["--stack", self.stack]
        event_log = None
        if args[0] in ENGINE_OPERATIONS:
            (self.base / "events").mkdir(exist_ok=True)
            event_log = self.base / "events" / f"{len(self.runs):03d}-{args[0]}.jsonl"
            argv += ["--event-log", str(event_log)]
        started, wall = time.monotonic(), time.time()
        returncode, out, err = cli.run_bounded(
            [*self.prefix, *argv], self.project, {**self.env(), **(env or {})}, timeout
        )
        seconds = time.monotonic() - started
        run = Run(argv, returncode, out, err, seconds, started=wall, secret=secret_stdout, event_log=event_log)
        self.runs.append(run)
        with (self.base / "pulumi.log").open("a") as log:
            log.write(f"{run.describe()}\n--- stdout\n{'(secret)' if secret_stdout else run.stdout}\n\n")
        return run

    def set_config(self, config: dict[str, Any]) -> None:
        """Replace the stack file's config (its encryption salt stays)."""
        stack_file = self.project / f"Pulumi.{self.stack}.yaml"
        written = yaml.safe_load(stack_file.read_text()) or {}
        stack_file.write_text(yaml.safe_dump({**written, "config": config}, sort_keys=False))

    def config(self) -> dict[str, Any]:
        stack_file = self.project / f"Pulumi.{self.stack}.yaml"
        return dict((yaml.safe_load(stack_file.read_text()) or {}).get("config", {}))

    def state_files(self) -> list[Path]:
        """Every file of the file backend: the stack's JSON, its backup and the history."""
        return sorted(path for path in (self.base / "state").rglob("*") if path.is_file())

    def export(self) -> dict[str, Any]:
        """The stack's state (secrets stay ciphertext)."""
        exported = self.pulumi("stack", "export", "--stack", self.stack)
        assert exported.returncode == 0, exported.describe()
        return dict(json.loads(exported.stdout)["deployment"])

    def resources(self) -> dict[str, dict[str, Any]]:
        return {resource["urn"]: resource for resource in self.export().get("resources", [])}

    def urn(self, type_: str, name: str) -> str:
        return f"urn:pulumi:{self.stack}::kubeadm-ha::{type_}::{name}"

    def secret_output(self, name: str) -> str:
        shown = self.pulumi("stack", "output", name, "--show-secrets", "--stack", self.stack, secret_stdout=True)
        assert shown.returncode == 0, f"pulumi stack output {name} failed (exit {shown.returncode})"
        return shown.stdout.strip()

    def output(self, name: str) -> Any:
        shown = self.pulumi("stack", "output", name, "--json", "--stack", self.stack)
        assert shown.returncode == 0, shown.describe()
        return json.loads(shown.stdout)
