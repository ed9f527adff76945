"""The readiness step's script: a new node is ready once cloud-init is done and the node preparation it ran has
completed (components/vm.py runs it as each Vm's `wait-for-cloud-init` step)."""

from __future__ import annotations

from render.cloudinit import PREPARATION_PATH
from render.node_prep import LOG_NAME as PREP_LOG_NAME
from render.node_prep import PREPARED_MARKER
from render.scripts import LOG_DIR, Script, command, logged, quote

CLOUD_INIT_TIMEOUT_SECONDS = 1800
READY_MARKER = "/var/lib/kubeadm-ha/cloud-init-done"
_SHOW_CLOUD_INIT_STATUS = "cloud-init status --long >&2 || true"


def readiness_script(hostname: str) -> Script:
    """Wait (bounded) until cloud-init is done and the node preparation it ran has completed.

    What matters is the preparation's marker. The preparation runs once, from cloud-init's `runcmd`, and a
    passing failure (a mirror timing out) would leave the node unusable for good; it is idempotent and
    stays on the node, so when cloud-init has finished without the marker it is run again, and the tail
    of its log is shown if it fails again. cloud-init's own errors are shown, not fatal by themselves
    (`status --wait` exits 1 when runcmd failed, 2 for "done with recoverable errors", such as deprecated
    keys). Only a cloud-init still running at the bound fails at once: its preparation may still be running.
    """
    prep_failed = f"kubeadm-ha: node preparation did not complete on {hostname}; running it again"
    unfinished = f"kubeadm-ha: cloud-init did not finish within {CLOUD_INIT_TIMEOUT_SECONDS} s on {hostname}:"
    return Script(
        step="wait-for-cloud-init",
        host=hostname,
        done_when=f"[ -f {READY_MARKER} ]",
        body=(
            "rc=0",
            f"timeout {CLOUD_INIT_TIMEOUT_SECONDS} cloud-init status --wait >/dev/null || rc=$?",
            'if [ "$rc" -eq 2 ]; then',
            '  echo "kubeadm-ha: cloud-init finished with recoverable errors on ${KUBEADM_HA_HOST}:" >&2',
            f"  {_SHOW_CLOUD_INIT_STATUS}",
            'elif [ "$rc" -eq 124 ]; then',
            f"  echo {quote(unfinished)} >&2",
            f"  {_SHOW_CLOUD_INIT_STATUS}",
            "  exit 1",
            'elif [ "$rc" -ne 0 ]; then',
            '  echo "kubeadm-ha: cloud-init did not finish cleanly on ${KUBEADM_HA_HOST}:" >&2',
            f"  {_SHOW_CLOUD_INIT_STATUS}",
            "fi",
            f"if [ ! -f {PREPARED_MARKER} ]; then",
            f"  echo {quote(prep_failed)} >&2",
            # `logged` shows the tail of the preparation's own log if it fails again.
            "  " + logged(PREP_LOG_NAME, "timeout", CLOUD_INIT_TIMEOUT_SECONDS, PREPARATION_PATH),
            "fi",
            f"[ -f {PREPARED_MARKER} ] || {{ echo "
            + quote("kubeadm-ha: node preparation did not complete on ")
            + '"${KUBEADM_HA_HOST}"'
            + quote(f"; see {LOG_DIR}/{PREP_LOG_NAME}.log on the node")
            + " >&2; exit 1; }",
            command("touch", READY_MARKER),
        ),
    )
