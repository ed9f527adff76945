import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def sandbox_support(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Probe once whether scripts can run in a mount-namespace sandbox (tests/sandbox.py): skip, or fail in CI."""
    from tests.sandbox import require_sandbox

    require_sandbox(tmp_path_factory.mktemp("probe"))
