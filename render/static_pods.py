"""Restarting a control plane's static pods one at a time behind the load balancers, so that a step can stop
anywhere and the next run finishes the job: the part the certificate renewal (render/renewal.py) and the
control-plane settings (render/control_plane_config.py) share.

A restart moves the component's manifest out of the static pod directory into a *held* directory (kubelet
stops the pod), waits for the container to be gone, and moves a manifest back (the same one for a renewal,
the new one for a change of settings). Before anything restarts, the step writes one marker per component
into a *pending* directory; a marker goes only once that component answers its health check again. A re-run
first puts back whatever is held, then restarts every component still marked, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

from render import lb_config
from render.kubeadm import PKI_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import bounded_wait_function, quote
from render.scripts import command as shell

# Restarted in this order, each healthy before the next: the API server first, so the others reconnect to a
# server that already runs the change; etcd last (stacked only), once nothing depends on it.
STATIC_PODS = (
    ("kube-apiserver", "https://127.0.0.1:6443/readyz"),
    ("kube-controller-manager", "https://127.0.0.1:10257/healthz"),
    ("kube-scheduler", "https://127.0.0.1:10259/healthz"),
)
STACKED_ETCD = ("etcd", "http://127.0.0.1:2381/readyz")
STOP_TIMEOUT_SECONDS = 120
HEALTHY_TIMEOUT_SECONDS = 300
POLL_SECONDS = 2


@dataclass(frozen=True)
class Restarts:
    """Where one kind of step keeps its record, and what it says once a component runs the change."""

    held_dir: str
    pending_dir: str
    # "restarted with the renewed certificates": completes "kubeadm-ha: <component> ..."
    restarted: str


def pods(stacked_etcd: bool) -> tuple[tuple[str, str], ...]:
    """The static pods a step restarts, in order, each with its health URL."""
    return (*STATIC_PODS, *((STACKED_ETCD,) if stacked_etcd else ()))


def functions() -> tuple[str, ...]:
    """`kha_wait`, `container_gone NAME`, `answers URL`, `etcd_answers`: what the restarts call."""
    return (
        *bounded_wait_function(POLL_SECONDS),
        "container_gone() {",
        '  [ -z "$(crictl ps --quiet --name "^$1\\$" 2>/dev/null)" ]',
        "}",
        "answers() {",
        f'  curl --silent --fail --max-time 5 --cacert {quote(PKI_DIR + "/ca.crt")} "$1" >/dev/null 2>&1 ||',
        # The controller manager and scheduler serve self-signed certificates on loopback.
        '    curl --silent --fail --max-time 5 --insecure "$1" >/dev/null 2>&1',
        "}",
        "etcd_answers() {",
        "  curl --silent --fail --max-time 5 http://127.0.0.1:2381/readyz >/dev/null 2>&1",
        "}",
    )


def _finish(
    restarts: Restarts, name: str, check: str, *, held_down: int, settle: int, after: tuple[str, ...]
) -> list[str]:
    """The rest of a restart of static pod `name` whose manifest is held: container gone, `held_down` seconds,
    manifest back, healthy, `settle` seconds, `after`; only then is its marker removed."""
    manifest = f"{STATIC_POD_DIR}/{name}.yaml"
    held = f"{restarts.held_dir}/{name}.yaml"
    lines = [
        f"if [ -f {quote(held)} ]; then",
        "  " + shell("kha_wait", STOP_TIMEOUT_SECONDS, f"{name} to stop", "container_gone", name),
    ]
    if held_down:
        lines.append("  " + shell("sleep", held_down))
    lines += [
        "  " + shell("mv", "-f", held, manifest),
        "  " + f"kha_wait {HEALTHY_TIMEOUT_SECONDS} {quote(f'{name} to be healthy again')} {check}",
    ]
    if settle:
        lines.append("  " + shell("sleep", settle))
    return [
        *lines,
        *("  " + line for line in after),
        "  " + shell("rm", "-f", f"{restarts.pending_dir}/{name}"),
        f"  echo {quote(f'kubeadm-ha: {name} {restarts.restarted}')}",
        "fi",
    ]


def finishes(restarts: Restarts, *, stacked_etcd: bool) -> dict[str, list[str]]:
    """Each component's `_finish`, with the waits its place behind the load balancers needs."""
    apiserver = dict(STATIC_PODS)["kube-apiserver"]
    found: dict[str, list[str]] = {}
    for name, url in pods(stacked_etcd):
        if name == "kube-apiserver":
            # Out of every load balancer before it comes back, so no client reaches it before it is ready
            # (a 403 from its empty RBAC cache otherwise), and back in before the step moves on.
            found[name] = _finish(
                restarts,
                name,
                shell("answers", url),
                held_down=lb_config.BACKEND_OUT_OF_ROTATION_S,
                settle=lb_config.BACKEND_BACK_IN_ROTATION_S,
                after=(),
            )
        elif name == "etcd":
            # The API server here reads only its own member: it turned unready with it, and the load balancers
            # took it out. Like after its own restart, the step moves on once they have it back.
            found[name] = _finish(
                restarts,
                name,
                "etcd_answers",
                held_down=0,
                settle=0,
                after=(
                    f"kha_wait {HEALTHY_TIMEOUT_SECONDS} {quote('kube-apiserver to be ready on the restarted etcd')} "
                    + shell("answers", apiserver),
                    shell("sleep", lb_config.BACKEND_BACK_IN_ROTATION_S),
                ),
            )
        else:
            found[name] = _finish(restarts, name, shell("answers", url), held_down=0, settle=0, after=())
    return found


def restart(restarts: Restarts, name: str, finish: list[str], host: str) -> list[str]:
    """Restart static pod `name` if it is still marked: manifest out, then `finish`. A marker without any
    manifest (the component was removed by hand) has nothing to restart."""
    manifest = f"{STATIC_POD_DIR}/{name}.yaml"
    marker = f"{restarts.pending_dir}/{name}"
    return [
        f"if [ -f {quote(marker)} ]; then",
        f"  if [ -f {quote(manifest)} ]; then",
        "    " + shell("mv", "-f", manifest, f"{restarts.held_dir}/{name}.yaml"),
        "  fi",
        *("  " + line for line in finish),
        f"  if [ -f {quote(marker)} ]; then",
        f"    echo {quote(f'kubeadm-ha: no static pod manifest for {name} on {host}; nothing to restart')}",
        "    " + shell("rm", "-f", marker),
        "  fi",
        "fi",
    ]
