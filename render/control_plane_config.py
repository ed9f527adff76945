"""The control-plane settings step: bring a running control plane's static pods to the program's
ClusterConfiguration, one component at a time behind the load balancers (issue 20: new flags reach running
clusters through `pulumi up`).

A new control plane gets its settings from `kubeadm init`/`join`; nothing re-renders the manifests later,
so a setting added to the program (a flag, the audit policy) would otherwise reach only new clusters. This
step does what kubeadm's "Reconfiguring a kubeadm cluster" task does by hand:

* the files the flags point at (the audit policy) are written first, from the step's stdin;
* kubeadm renders the kube-apiserver, kube-controller-manager and kube-scheduler manifests from the
  program's documents into a scratch directory (`kubeadm init phase control-plane all`, in a private mount
  namespace where the static pod directory is that scratch directory), so nothing restarts yet;
* stacked etcd's manifest gets only the flags the program owns (quota, compaction) edited in:
  `kubeadm init phase etcd local` would also rewrite a joined member's `--initial-cluster`;
* each component whose manifest differs is marked, then restarted with the new manifest one at a time, in
  render/static_pods.py's order and with its load-balancer waits; a re-run finishes what a stopped run left;
* `kubeadm init phase upload-config kubeadm` and `kubelet` store the ClusterConfiguration and the
  KubeletConfiguration in the cluster, so later joins and `kubeadm upgrade` keep the settings.

On a control plane `kubeadm` has just set up, every manifest already matches and nothing restarts. The step
records the digest of what it applied; its guard is that digest, with nothing held or marked.
"""

from __future__ import annotations

from collections.abc import Sequence

from render import hardening, static_pods
from render.kubeadm import CONFIG_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import INSTALL_BUNDLE_FUNCTION, STATE_DIR, Script, logged, quote
from render.scripts import command as shell

STEP = "control-plane-config"
SETTINGS_PATH = f"{CONFIG_DIR}/settings.yaml"
HELD_DIR = f"{CONFIG_DIR}/settings-held"
PENDING_DIR = f"{STATE_DIR}/settings-pending"
STAGED_DIR = f"{STATE_DIR}/settings-staged"
APPLIED_MARKER = f"{STATE_DIR}/control-plane-config.sha256"
RESTARTS = static_pods.Restarts(HELD_DIR, PENDING_DIR, "restarted with the program's settings")


def _functions(stacked_etcd: bool, etcd_flags: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    names = " ".join(quote(name) for name, _ in static_pods.pods(stacked_etcd))
    flag_patterns = " ".join(quote(f"--{name}={value}") for name, value in etcd_flags)
    flag_names = " ".join(quote(f"--{name}=") for name, _ in etcd_flags)
    # A flag the program sets only with its key (etcd.timing) comes out once the key is gone.
    given = {name for name, _ in etcd_flags}
    dropped = " ".join(quote(f"--{name}=") for name in hardening.ETCD_TIMING_FLAGS if name not in given)
    etcd = _etcd_manifest_function(flag_patterns, flag_names, dropped) if etcd_flags else ()
    return (
        *INSTALL_BUNDLE_FUNCTION,
        *static_pods.functions(),
        # True when no earlier run left a component held or marked; otherwise says which.
        "settings_finished() {",
        "  local name",
        f"  for name in {names}; do",
        f'    if [ -e {quote(HELD_DIR)}/"$name.yaml" ] || [ -e {quote(PENDING_DIR)}/"$name" ]; then',
        '      echo "kubeadm-ha: an earlier run left ${name} on ${KUBEADM_HA_HOST} to restart; finishing it"',
        "      return 1",
        "    fi",
        "  done",
        "}",
        *etcd,
    )


def _etcd_manifest_function(flag_patterns: str, flag_names: str, dropped: str) -> tuple[str, ...]:
    """Only with stacked etcd, whose manifest the step edits."""
    return (
        # `etcd_manifest IN OUT`: IN with the program's etcd flags, each replacing any value it had, and without
        # the `dropped` ones. Only when one is missing, different or still there; otherwise OUT is IN byte for
        # byte (kubeadm sorts its flags, so a manifest kubeadm made with them stays as it is).
        "etcd_manifest() {",
        '  local flag stale=""',
        f"  for flag in {flag_patterns}; do",
        '    grep -qE -- "^ *- ${flag}\\$" "$1" || stale=1',
        "  done",
        *(
            (f"  for flag in {dropped}; do", '    if grep -qE -- "^ *- ${flag}" "$1"; then stale=1; fi', "  done")
            if dropped
            else ()
        ),
        '  cp "$1" "$2"',
        '  [ -n "$stale" ] || return 0',
        f"  for flag in {' '.join(filter(None, (flag_names, dropped)))}; do",
        '    sed -i -E -- "/^ *- ${flag}/d" "$2"',
        "  done",
        # Inserted right after the `- etcd` command word, in the program's order.
        f"  for flag in $(printf '%s\\n' {flag_patterns} | tac); do",
        '    sed -i -E -- "s|^( *)- etcd\\$|&\\n\\1- ${flag}|" "$2"',
        "  done",
        '  if ! grep -qE "^ *- etcd$" "$2"; then',
        '    echo "kubeadm-ha: no etcd command in $1 on ${KUBEADM_HA_HOST}" >&2',
        "    return 1",
        "  fi",
        "}",
    )


def _restart_with_staged(name: str, host: str) -> list[str]:
    """render/static_pods.py's restart, but the manifest that comes back is the staged (new) one."""
    manifest, staged, held = f"{STATIC_POD_DIR}/{name}.yaml", f"{STAGED_DIR}/{name}.yaml", f"{HELD_DIR}/{name}.yaml"
    move_out = [
        f"if [ -f {quote(manifest)} ]; then {shell('mv', '-f', manifest, held)}; fi",
        f"if [ -f {quote(staged)} ]; then {shell('mv', '-f', staged, held)}; fi",
    ]
    return static_pods.restart(RESTARTS, name, host, move_out=move_out)


def control_plane_config_script(
    host: str, digest: str, *, stacked_etcd: bool, etcd_flags: Sequence[tuple[str, str]], directories: Sequence[str]
) -> Script:
    """The step for control plane `host`. Its stdin bundle holds SETTINGS_PATH (an InitConfiguration for this
    node and the ClusterConfiguration) and the files the flags name; `digest` covers all of it, and
    `directories` are created (0700) for what the components write (the audit log)."""
    pods = [name for name, _ in static_pods.pods(stacked_etcd)]
    body: list[str] = [
        shell("install", "-d", "-m", "0700", HELD_DIR, PENDING_DIR, STAGED_DIR, *directories),
        # The settings document and the files; nothing reads them until a component restarts.
        "install_bundle",
    ]
    # 1. A manifest an interrupted run left held goes back first (that restart finished).
    body += static_pods.put_back(RESTARTS, stacked_etcd=stacked_etcd)
    # 2. What each component's manifest should be, rendered where nothing watches.
    body += [
        'kha_scratch="$(mktemp -d)"',
        "trap 'rm -rf \"$kha_scratch\"' EXIT",
        "unshare --mount --propagation private -- bash -c "
        + quote('mount --bind "$1" "$2" && exec kubeadm init phase control-plane all --config "$3"')
        + " kubeadm-ha-render "
        + '"$kha_scratch" '
        + shell(STATIC_POD_DIR, SETTINGS_PATH)
        + ' >>"${KUBEADM_HA_LOG_DIR}/control-plane-config.log" 2>&1',
    ]
    if stacked_etcd:
        body.append(
            f"if [ -f {quote(f'{STATIC_POD_DIR}/etcd.yaml')} ]; then "
            f'etcd_manifest {quote(f"{STATIC_POD_DIR}/etcd.yaml")} "$kha_scratch/etcd.yaml"; fi'
        )
    # 3. Mark and stage every component that runs something else (only one that runs at all).
    for name in pods:
        current = f"{STATIC_POD_DIR}/{name}.yaml"
        body += [
            f'if [ -f {quote(current)} ] && ! cmp -s "$kha_scratch/{name}.yaml" {quote(current)}; then',
            "  " + shell("touch", f"{PENDING_DIR}/{name}"),
            f'  install -m 0600 "$kha_scratch/{name}.yaml" {quote(f"{STAGED_DIR}/{name}.yaml")}',
            "fi",
        ]
    # 4. Restart what is marked, one at a time, in order.
    for name in pods:
        body += _restart_with_staged(name, host)
    body += [
        logged(STEP, "kubeadm", "init", "phase", "upload-config", "kubeadm", "--config", SETTINGS_PATH),
        # The kubelet-config ConfigMap, which joins and `kubeadm upgrade node` write into every kubelet's file.
        logged(STEP, "kubeadm", "init", "phase", "upload-config", "kubelet", "--config", SETTINGS_PATH),
        f"printf '%s\\n' {quote(digest)} >{quote(APPLIED_MARKER)}",
    ]
    return Script(
        step=STEP,
        host=host,
        done_when=f'settings_finished && [ "$(cat {quote(APPLIED_MARKER)} 2>/dev/null)" = {quote(digest)} ]',
        functions=_functions(stacked_etcd, etcd_flags),
        body=tuple(body),
    )
