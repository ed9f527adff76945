"""The Pulumi toolchain of the engine lab: the CLI, the Python language host and the three provider plugins.

Used by `tests/real/build-binaries` (its Pulumi section) to build each name from the Go module proxy into
$KUBEADM_HA_BIN_CACHE/pulumi/<version>/<name>, and by the engine lab to find what was built.

Each name is built from a throwaway module that requires the upstream module and repeats the upstream
go.mod's replace directives (read from the module cache after `go mod download`): `go install pkg@version`
refuses a main module with replace directives. A replace that points at a local directory of the upstream
repository (pulumi-tls's `shim`) is not in the published module; its equivalent is written here (ADAPTERS).

Versions follow requirements.txt, except the CLI: the Go module proxy does not serve
github.com/pulumi/pulumi/pkg/v3 at v3.272.0 (the pinned SDK), so the CLI is the nearest served release
after it. A CLI runs programs of older SDKs; the language host must match the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("KUBEADM_HA_BIN_CACHE", Path.home() / ".cache" / "kubeadm-ha" / "bin"))
GROUP = "pulumi"
# github.com/pulumi/pulumi/pkg/v3@v3.272.0 (the pinned SDK) answers 403 "not available" on the proxy.
PULUMI_CLI_VERSION = "3.274.0"


@dataclass(frozen=True)
class Tool:
    module: str
    package: str  # the main package, relative to the module ("" for the module root)
    sdk: str  # the requirements.txt name whose pin gives the version ("" : the CLI's version)
    version_variable: str  # set by -ldflags -X to the version (the providers report it to the engine)

    def package_path(self) -> str:
        return f"{self.module}/{self.package}" if self.package else self.module


TOOLS = {
    "pulumi": Tool(
        "github.com/pulumi/pulumi/pkg/v3", "cmd/pulumi", "", "github.com/pulumi/pulumi/sdk/v3/go/common/version.Version"
    ),
    "pulumi-language-python": Tool(
        "github.com/pulumi/pulumi/sdk/python/cmd/pulumi-language-python/v3",
        "",
        "",
        "github.com/pulumi/pulumi/sdk/v3/go/common/version.Version",
    ),
    "pulumi-resource-command": Tool(
        "github.com/pulumi/pulumi-command/provider",
        "cmd/pulumi-resource-command",
        "pulumi-command",
        "github.com/pulumi/pulumi-command/provider/pkg/version.Version",
    ),
    "pulumi-resource-tls": Tool(
        "github.com/pulumi/pulumi-tls/provider/v5",
        "cmd/pulumi-resource-tls",
        "pulumi-tls",
        "github.com/pulumi/pulumi-tls/provider/v5/pkg/version.Version",
    ),
    "pulumi-resource-libvirt": Tool(
        "github.com/pulumi/pulumi-libvirt/provider",
        "cmd/pulumi-resource-libvirt",
        "pulumi-libvirt",
        "github.com/pulumi/pulumi-libvirt/provider/pkg/version.Version",
    ),
}

# Local-directory replaces of upstream go.mod files, re-created here: module path -> (go.mod, source).
# pulumi-tls bridges hashicorp's provider through `./shim`, a module that lives under
# terraform-provider-tls's path so that it may import the provider's internal package.
ADAPTERS = {
    "github.com/hashicorp/terraform-provider-tls/shim": (
        "module github.com/hashicorp/terraform-provider-tls/shim\n\ngo 1.24\n",
        (
            "package shim\n\n"
            "import (\n"
            '\t"github.com/hashicorp/terraform-plugin-framework/provider"\n'
            '\ttls "github.com/hashicorp/terraform-provider-tls/internal/provider"\n'
            ")\n\n"
            "// NewProvider is the upstream TLS provider, as the bridge expects it.\n"
            "func NewProvider() provider.Provider { return tls.New() }\n"
        ),
    ),
}

_GO_ENV = {"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
_REPLACE_LINE = re.compile(r"^\s*(?:replace\s+)?(\S+)(?:\s+(v\S+))?\s+=>\s+(\S+)(?:\s+(v\S+))?\s*$")


class BuildError(SystemExit):
    pass


def log(message: str) -> None:
    print(f"build-binaries: {message}", file=sys.stderr, flush=True)


def pinned(sdk: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip() == sdk:
            return version.strip()
    raise BuildError(f"build-binaries: {sdk} is not pinned in requirements.txt")


def default_version(name: str) -> str:
    tool = TOOLS[name]
    return pinned(tool.sdk) if tool.sdk else PULUMI_CLI_VERSION


def cached(name: str, version: str | None = None) -> Path:
    return CACHE / GROUP / (version or default_version(name)) / name


def _go(args: list[str], cwd: Path, *, niceness: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["nice", "-n", "10", "go", *args] if niceness else ["go", *args]
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **_GO_ENV}, capture_output=True, text=True, check=False)


def _download(module: str, version: str, work: Path) -> Path:
    result = _go(["mod", "download", "-json", f"{module}@{version}"], work)
    error = re.search(r'"Error":\s*"((?:[^"\\]|\\.)*)"', result.stdout)
    directory = re.search(r'"Dir":\s*"([^"]+)"', result.stdout)
    if result.returncode != 0 or error or not directory:
        reason = error[1].encode().decode("unicode_escape") if error else result.stderr.strip()
        raise BuildError(f"build-binaries: the Go module proxy does not give {module}@{version}: {reason}")
    return Path(directory[1])


def upstream_replaces(go_mod: str) -> list[tuple[str, str]]:
    """(old, new) of every replace directive in an upstream go.mod, versions included."""
    found: list[tuple[str, str]] = []
    in_block = False
    for raw in go_mod.splitlines():
        line = raw.split("//", 1)[0].strip()
        if line.startswith("replace ("):
            in_block = True
            continue
        if in_block and line == ")":
            in_block = False
            continue
        if (in_block or line.startswith("replace ")) and "=>" in line:
            match = _REPLACE_LINE.match(line)
            if match:
                old = f"{match[1]} {match[2]}" if match[2] else match[1]
                new = f"{match[3]} {match[4]}" if match[4] else match[3]
                found.append((old, new))
    return found


def _replaces(tool: Tool, version: str, source: Path, work: Path) -> list[str]:
    lines = []
    for old, new in upstream_replaces((source / "go.mod").read_text()):
        target = new.split()[0]
        if not target.startswith((".", "/")):
            lines.append(f"\t{old} => {new}")
            continue
        module = old.split()[0]
        if module.startswith("github.com/pulumi/pulumi/") and module.endswith("/v3"):
            # The pulumi repository's own modules, replaced by their sibling directories: the published
            # module at the same release.
            lines.append(f"\t{module} => {module} v{version if not tool.sdk else _pulumi_sdk_of(source)}")
        elif module in ADAPTERS:
            adapter = work / "adapters" / module.rsplit("/", 1)[-1]
            adapter.mkdir(parents=True, exist_ok=True)
            go_mod, code = ADAPTERS[module]
            (adapter / "go.mod").write_text(go_mod)
            (adapter / "adapter.go").write_text(code)
            lines.append(f"\t{module} => ./adapters/{adapter.name}")
        else:
            raise BuildError(f"build-binaries: {tool.module} replaces {module} with {new}, which no adapter provides")
    return lines


def _pulumi_sdk_of(source: Path) -> str:
    match = re.search(r"github\.com/pulumi/pulumi/sdk/v3 v(\S+)", (source / "go.mod").read_text())
    if not match:
        raise BuildError(f"build-binaries: {source}/go.mod requires no github.com/pulumi/pulumi/sdk/v3")
    return match[1]


def build(name: str, version: str | None = None) -> tuple[str, Path]:
    """Build `name` (cached) and return (version, absolute path)."""
    tool = TOOLS[name]
    version = version or default_version(name)
    out = cached(name, version)
    if out.is_file():
        return version, out
    work = CACHE / "work" / f"{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module kubeadmha.test/build\n\ngo 1.22\n")
    started = time.monotonic()
    source = _download(tool.module, f"v{version}", work)
    go_version = re.search(r"^go (\S+)", (source / "go.mod").read_text(), re.M)
    requires = [f"\t{tool.module} v{version}"]
    if tool.module != "github.com/pulumi/pulumi/sdk/v3" and "/pulumi/pulumi/" in tool.module:
        requires.append(f"\tgithub.com/pulumi/pulumi/sdk/v3 v{version}")
    replaces = _replaces(tool, version, source, work)
    text = ["module kubeadmha.test/build", "", f"go {go_version[1] if go_version else '1.22'}", "", "require ("]
    text += [*requires, ")"]
    if replaces:
        text += ["", "replace (", *replaces, ")"]
    (work / "go.mod").write_text("\n".join(text) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The CLI and language host report `v3.x.y`; the providers their plain version, as their releases do.
    ldflags = f"-s -w -X {tool.version_variable}={'' if tool.sdk else 'v'}{version}"
    result = _go(["build", "-trimpath", "-ldflags", ldflags, "-o", str(out), tool.package_path()], work, niceness=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-8000:])
        raise BuildError(f"build-binaries: go build {tool.package_path()}@v{version} failed (exit {result.returncode})")
    log(f"built {name} {version} in {time.monotonic() - started:.0f} s")
    return version, out
