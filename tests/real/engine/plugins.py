"""Install the built toolchain into a test's own PULUMI_HOME so that the engine never downloads anything.

The engine asks for each provider plugin at the version in the Python SDK's `pulumi-plugin.json` (the language
host reports the installed SDK packages' plugins), looks in $PULUMI_HOME/plugins, then for `pulumi-resource-NAME`
on $PATH, and downloads only when both fail; PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=true turns that
download into an error (../shared/third_party/README.md, "Running the engine with them"). So every plugin is
installed from its built file with `pulumi plugin install resource NAME VERSION --file PATH` under the version
the SDK asks for, and that version must be the one built: an SDK pin and a plugin that disagree are refused
here, naming both, rather than run with a mismatch the engine only warns about.

The language host (and pulumi-language-python-exec) goes beside the CLI: the engine looks for the bundled
Python host next to the running `pulumi` (toolchain.py's docstring).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.integration.conftest import unavailable
from tests.real.engine import toolchain
from tests.real.engine.cli import UserSession

# Resource plugin name -> the Python SDK package that asks for it.
PROVIDERS = {"command": "pulumi_command", "tls": "pulumi_tls", "libvirt": "pulumi_libvirt"}
NO_DOWNLOADS = {
    "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
    "PULUMI_SKIP_UPDATE_CHECK": "true",
}


def sdk_plugin_version(package: str) -> str:
    """The plugin version the installed SDK package asks the engine for (its pulumi-plugin.json)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not installed"
    return str(json.loads((Path(spec.origin).parent / "pulumi-plugin.json").read_text())["version"])


def built(name: str) -> Path:
    """A built tool of the pinned version; skip (fail under CI=true) naming the command that builds it."""
    path = toolchain.cached(name)
    if not path.is_file():
        unavailable(f"{name} {toolchain.default_version(name)} is not built: run tests/real/build-binaries {name}")
    return path


def plugin_files() -> dict[str, tuple[str, Path]]:
    """Resource plugin name -> (the version the SDK asks for, the built file), checked to agree."""
    found = {}
    for plugin, package in PROVIDERS.items():
        name = f"pulumi-resource-{plugin}"
        asked, pinned = sdk_plugin_version(package), toolchain.default_version(name)
        if asked != pinned:
            raise AssertionError(
                f"the installed {package} asks for plugin {plugin} {asked}, but requirements.txt pins and "
                f"build-binaries builds {pinned}: run pip install -r requirements-dev.txt"
            )
        found[plugin] = (asked, built(name))
    return found


def cli_directory() -> Path:
    """The directory holding the paired CLI and language host (with its -exec script)."""
    cli, host = built("pulumi"), built("pulumi-language-python")
    assert cli.parent == host.parent and (host.parent / toolchain.LANGUAGE_HOST_EXEC).is_file(), (cli, host)
    return cli.parent


def install_commands() -> list[list[str]]:
    """The `pulumi plugin install` argv (without `pulumi`) for every provider plugin."""
    return [
        ["plugin", "install", "resource", plugin, version, "--file", str(path)]
        for plugin, (version, path) in plugin_files().items()
    ]


def install_into(pulumi_home: Path, timeout: float = 120) -> dict[str, str]:
    """Install every provider plugin into `pulumi_home`; return the environment that runs the engine on it.

    The environment has the CLI directory first on PATH, PULUMI_HOME set and downloads disabled.
    """
    directory = cli_directory()
    env = {
        **os.environ,
        **NO_DOWNLOADS,
        "PULUMI_HOME": str(pulumi_home),
        "PATH": os.pathsep.join([str(directory), os.environ.get("PATH", "")]),
    }
    for argv in install_commands():
        done = subprocess.run(
            [str(directory / "pulumi"), *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"pulumi {' '.join(argv)} failed: {done.stdout}{done.stderr}"
    return env


def install_for(user: UserSession) -> None:
    """Give a fresh-home user session the paired CLI and language host, and install every plugin into its home.

    The files are copied outside the real home (hidden inside the session's namespace); the plugins land in
    the fresh home's ~/.pulumi, the session's own PULUMI_HOME, and its environment disables downloads.
    """
    directory = cli_directory()
    assert user.env()["PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"] == "true"
    for name in ("pulumi", "pulumi-language-python", toolchain.LANGUAGE_HOST_EXEC):
        user.tool(directory / name)
    # Not in the session's bin (on PATH): the engine takes a `pulumi-resource-NAME` found on $PATH before
    # $PULUMI_HOME/plugins (GetPluginPath, sdk/go/common/workspace/plugins.go), which would bypass the install.
    files = user.base / "plugin-files"
    files.mkdir(exist_ok=True)
    for argv in install_commands():
        copy = files / Path(argv[-1]).name
        shutil.copy2(argv[-1], copy)
        argv[-1] = str(copy)
        installed = user.pulumi(*argv)
        assert installed.returncode == 0, installed.describe()
    listed = user.pulumi("plugin", "ls", "--json")
    assert listed.returncode == 0, listed.describe()
    have = {(p["name"], p["kind"], p["version"]) for p in json.loads(listed.stdout)}
    wanted = {(plugin, "resource", version) for plugin, (version, _) in plugin_files().items()}
    assert wanted <= have, (wanted, have)
