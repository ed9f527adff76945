"""Restarting a control plane's static pods one at a time behind the load balancers, so that a step can stop
anywhere and the next run finishes the job: the part the certificate renewal (render/renewal.py) and the
control-plane settings (render/control_plane_config.py) share.

A restart moves the component's manifest out of the static pod directory into a *held* directory (kubelet
stops the pod), waits for the container to be gone, and moves a manifest back (the same one for a renewal,
the new one for a change of settings). Before anything restarts, the step writes one marker per component
into a *pending* directory; a marker goes only once that component answers its health check again. A re-run
first puts back whatever is held (etcd first: an API server held with it answers only once it runs), then
restarts every component still marked, in the same order.

On a stacked control plane the API server reads only its own etcd member. etcd's restart therefore holds the
API server too, and out of every load balancer before etcd stops: a request HAProxy sent it while its member
was down would wait on etcd and fail, or be cut when HAProxy marked it down (`on-marked-down
shutdown-sessions`), where a refused connection is redispatched to another control plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from render import lb_config
from render.kubeadm import PKI_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import bounded_wait_function, quote
from render.scripts import command as shell

# Restarted in this order, each healthy before the next: the API server first, so the others reconnect to a
# server that already runs the change; etcd last (stacked only), with the API server held out of rotation.
STATIC_PODS = (
    ("kube-apiserver", "https://127.0.0.1:6443/readyz"),
    ("kube-controller-manager", "https://127.0.0.1:10257/healthz"),
    ("kube-scheduler", "https://127.0.0.1:10259/healthz"),
)
APISERVER = "kube-apiserver"
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
    restarts: Restarts,
    name: str,
    check: str,
    *,
    held_down: int,
    settle: int,
    mark_done: bool = True,
) -> list[str]:
    """The rest of a restart of static pod `name` whose manifest is held: container gone, `held_down` seconds,
    manifest back, healthy, `settle` seconds; only then is its marker removed (unless not `mark_done`)."""
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
    if mark_done:
        lines += [
            "  " + shell("rm", "-f", f"{restarts.pending_dir}/{name}"),
            f"  echo {quote(f'kubeadm-ha: {name} {restarts.restarted}')}",
        ]
    return [*lines, "fi"]


def _finish_apiserver(restarts: Restarts, *, held_down: bool, mark_done: bool = True) -> list[str]:
    # Out of every load balancer before it comes back, so no client reaches it before it is ready (a 403 from
    # its empty RBAC cache otherwise), and back in before the step moves on.
    return _finish(
        restarts,
        APISERVER,
        shell("answers", dict(STATIC_PODS)[APISERVER]),
        held_down=lb_config.BACKEND_OUT_OF_ROTATION_S if held_down else 0,
        settle=lb_config.BACKEND_BACK_IN_ROTATION_S,
        mark_done=mark_done,
    )


def _finish_of(restarts: Restarts, name: str, url: str) -> list[str]:
    if name == APISERVER:
        return _finish_apiserver(restarts, held_down=True)
    if name == "etcd":
        return _finish(restarts, name, "etcd_answers", held_down=0, settle=0)
    return _finish(restarts, name, shell("answers", url), held_down=0, settle=0)


def put_back(restarts: Restarts, *, stacked_etcd: bool, only: str | None = None) -> list[str]:
    """What a step runs first: every manifest an interrupted run left held (of `only`, if given) goes back,
    and that restart is finished. etcd goes first: an API server held with it is ready only once etcd is."""
    ordered = sorted(pods(stacked_etcd), key=lambda pod: pod[0] != "etcd")
    ordered = [pod for pod in ordered if only is None or pod[0] == only]
    return [line for name, url in ordered for line in _finish_of(restarts, name, url)]


def _hold(restarts: Restarts, name: str) -> list[str]:
    manifest = f"{STATIC_POD_DIR}/{name}.yaml"
    held = f"{restarts.held_dir}/{name}.yaml"
    return [f"if [ -f {quote(manifest)} ]; then", "  " + shell("mv", "-f", manifest, held), "fi"]


def restart(restarts: Restarts, name: str, host: str, *, move_out: Sequence[str] | None = None) -> list[str]:
    """Restart static pod `name` if it is still marked: its manifest into the held directory (`move_out`, by
    default the one in place), then the rest of the restart. A marker without any manifest (the component
    was removed by hand) has nothing to restart. etcd (stacked) holds the API server first, out of rotation."""
    marker = f"{restarts.pending_dir}/{name}"
    held_apiserver = f"{restarts.held_dir}/{APISERVER}.yaml"
    before: list[str] = []
    finish = _finish_of(restarts, name, dict(pods(stacked_etcd=True))[name])
    if name == "etcd":
        before = [
            *_hold(restarts, APISERVER),
            f"if [ -f {quote(held_apiserver)} ]; then",
            "  " + shell("kha_wait", STOP_TIMEOUT_SECONDS, "kube-apiserver to stop", "container_gone", APISERVER),
            "  " + shell("sleep", lb_config.BACKEND_OUT_OF_ROTATION_S),
            "fi",
        ]
        finish = [*finish, *_finish_apiserver(restarts, held_down=False, mark_done=False)]
    out = list(move_out) if move_out is not None else _hold(restarts, name)
    return [
        f"if [ -f {quote(marker)} ]; then",
        *("  " + line for line in (*before, *out, *finish)),
        f"  if [ -f {quote(marker)} ]; then",
        f"    echo {quote(f'kubeadm-ha: no static pod manifest for {name} on {host}; nothing to restart')}",
        "    " + shell("rm", "-f", marker),
        "  fi",
        "fi",
    ]
