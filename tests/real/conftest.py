import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real: runs real kubeadm, kube-apiserver and etcd built by tests/real/build-binaries"
    )
