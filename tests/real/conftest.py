import os
from pathlib import Path

import pytest

# Labs too slow for every CI run get a command of their own (README: "What the tests prove"):
# tests/real/encryption-lab runs test_encryption_live.py (about 11 minutes) with KUBEADM_HA_ENCRYPTION_LAB=1.
LABS = {"test_encryption_live.py": "KUBEADM_HA_ENCRYPTION_LAB"}
collect_ignore = [name for name, variable in LABS.items() if os.environ.get(variable) != "1"]
assert all((Path(__file__).parent / name).is_file() for name in LABS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real: runs real kubeadm, kube-apiserver and etcd built by tests/real/build-binaries"
    )
