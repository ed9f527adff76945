"""The engine lab runs from `tests/real/engine-lab` (KUBEADM_HA_ENGINE_LAB=1), not in the fast suite, except
test_engine_preview.py, which the suite (and so CI) runs.

The lab needs a libvirtd of its own, guests under TCG and a Debian image, far beyond the fast suite's time;
`tests/real/engine-lab` builds the toolchain first and runs these tests. The CI part needs only the toolchain
(built by tests/run-all.sh with the suite's binaries) and a libvirtd it starts itself; see its docstring.
"""

import os
from pathlib import Path

IN_THE_SUITE = {"test_engine_preview.py"}
collect_ignore = (
    []
    if os.environ.get("KUBEADM_HA_ENGINE_LAB") == "1"
    else [path.name for path in Path(__file__).parent.glob("test_*.py") if path.name not in IN_THE_SUITE]
)
