"""The containerd config node preparation writes, loaded by a real containerd 2.2 (what Ubuntu 24.04's
noble-updates and Ubuntu 26.04 ship), built from its Go module by tests/real/build-binaries.

`containerd config dump` prints the configuration the daemon would run with, after containerd 2.x has
migrated the version-2 file to its own layout: the runc runtime of the CRI plugin must come out with the
systemd cgroup driver kubelet is configured for (kubeadm.KubeletConfiguration.cgroup_driver).
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from render.kubeadm import KubeletConfiguration
from render.node_prep import CONTAINERD_CONFIG
from tests.integration.conftest import unavailable
from tests.real.binaries import _builder

CRI_RUNTIME = "io.containerd.cri.v1.runtime"


def containerd() -> str:
    builder = _builder()
    path = Path(builder.CACHE) / "containerd" / builder.CONTAINERD_VERSION / "containerd"
    if not path.is_file():
        unavailable(f"containerd is not built: run tests/real/build-binaries containerd@{builder.CONTAINERD_VERSION}")
    return str(path)


def dump(config: str, tmp_path: Path) -> dict:
    source = tmp_path / "config.toml"
    source.write_text(config)
    # Its own root/state dirs: `config dump` only loads and prints, but nothing may touch the host's.
    result = subprocess.run(
        [containerd(), "--config", str(source), "--root", str(tmp_path / "root"), "--state", str(tmp_path / "run"),
         "config", "dump"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


def runc(dumped: dict) -> dict:
    return dumped["plugins"][CRI_RUNTIME]["containerd"]["runtimes"]["runc"]


def test_containerd_2_runs_runc_with_the_systemd_cgroup_driver_kubelet_expects(tmp_path: Path) -> None:
    dumped = dump(CONTAINERD_CONFIG, tmp_path)
    assert dumped["version"] == 3  # migrated from the version-2 file
    assert runc(dumped)["runtime_type"] == "io.containerd.runc.v2"
    assert runc(dumped)["options"]["SystemdCgroup"] is True
    assert KubeletConfiguration().cgroup_driver == "systemd"


def test_without_the_file_containerd_2_would_use_cgroupfs(tmp_path: Path) -> None:
    # The control: the default is not what kubelet needs, so the file is what makes the node ready.
    assert runc(dump("version = 3\n", tmp_path))["options"].get("SystemdCgroup") is not True


def test_a_bundle_nodes_containerd_2_runs_sandboxes_from_kubeadms_pause_image(tmp_path: Path) -> None:
    # The bundle carries the pause image kubeadm names; containerd's own default is another tag.
    from model.bundle import kubeadm_images
    from model.config import KubernetesConfig
    from model.versions import release_for
    from render.node_prep import bundle_containerd_config

    kubernetes = KubernetesConfig()
    pause = next(image for image in kubeadm_images(kubernetes.version) if "/pause:" in image)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "internet").mkdir()
    dumped = dump(bundle_containerd_config(release_for(kubernetes.version).pause_tag), tmp_path / "bundle")
    assert dumped["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == pause
    assert runc(dumped)["options"]["SystemdCgroup"] is True
    assert (
        dump(CONTAINERD_CONFIG, tmp_path / "internet")["plugins"]["io.containerd.cri.v1.images"]["pinned_images"][
            "sandbox"
        ]
        != pause
    )
