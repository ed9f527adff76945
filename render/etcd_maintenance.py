"""etcd defragmentation on a timer, on every etcd member, and the alarm check that goes with it (issue 20).

etcd's database file never shrinks by itself: compaction (kube-apiserver's every 5 minutes, or etcd's own
with `etcd.maintenance.autoCompaction*`) frees pages inside it, and only a defragmentation gives them back.
The space quota counts the whole file, free pages included (etcd server/storage/quota.go,
`BackendQuota.Available`: `b.be.Size()+int64(cost) < b.maxBackendBytes`), so a cluster that only compacts can
still run into NOSPACE. Every member (each control plane with stacked etcd, each etcd VM with external etcd)
gets `kubeadm-ha-etcd-maintenance.timer`, which ticks hourly at a minute of its own and runs the script below:

1. The guard: nothing to do while this member was defragmented less than `defragIntervalHours` ago and no
   alarm is raised (so alarms are looked at every hour, defragmentation happens every interval).
2. `etcdctl alarm list`: a raised alarm (NOSPACE, CORRUPT) is logged at priority crit, written to the status
   file, and the run fails, so `systemctl --failed` shows it until someone acts. It is never disarmed here:
   etcd's own procedure for NOSPACE (etcd-io/website content/en/docs/v3.6/op-guide/maintenance.md, "Space
   quota") is to free space, compact to the current revision and defragment, and only then disarm; a disarm
   without that lets the next write raise it again, and which data to delete is the operator's call. CORRUPT
   means a member's data differs from the others': that wants a person (and a restore), not a timer. While
   NOSPACE is raised etcd refuses lease grants too (server/etcdserver/api/v3rpc/quota.go, `quotaLeaseServer`),
   so the lock below could not be taken anyway.
3. Every member must be healthy (`endpoint health --cluster`, each member asked on its own client URL, and no
   member unstarted): a member serves nothing while it defragments ("defragmentation to a live member blocks
   the system from reading and writing data while rebuilding its states", etcdctl/README.md, DEFRAG), so with
   another member down the cluster would be one failure from losing its quorum. Otherwise the run is skipped
   (exit 0, logged and in the status file) and the next hourly tick tries again. A member that is being
   defragmented answers no health check within etcdctl's 10 s, so this also keeps a member from starting while
   another is defragmenting, even one whose defragmentation outlasted its own bound.
4. The defragmentation itself, of the local member only, under a cluster-wide mutex (`etcdctl lock`, etcd's
   concurrency.Mutex: a key under `LOCK_NAME` held by a lease), so two members never defragment at once even when
   their checks raced. etcd does not defragment the cluster as a whole ("Defragmentation is issued on a
   per-member so that cluster-wide latency spikes may be avoided", op-guide/maintenance.md, "Defragmentation").

The timers' minutes are MINUTE_SPACING apart by member index, so members take turns without waiting on the
lock; the lock is for when they do not (a long defragmentation, a clock step, an operator's forced run).

Everything here is pure; components/etcd_maintenance.py wires one install step per member. The etcd tools
(`kha_etcdctl`, `kha_etcd_tool`: etcdctl from the member's own image through `ctr run`) are render/backup.py's.
"""

from __future__ import annotations

from render.backup import (
    KILL_AFTER_SECONDS,
    TOOL_TIMEOUT_SECONDS,
    UNIT_DIR,
    etcd_tool_functions,
    etcd_tool_service,
    etcdctl_client_flags,
    timer_install_script,
)
from render.scripts import STATE_DIR, Script, quote
from render.scripts import command as shell

SCRIPT_PATH = "/usr/local/sbin/kubeadm-ha-etcd-maintenance"
SERVICE = "kubeadm-ha-etcd-maintenance.service"
TIMER = "kubeadm-ha-etcd-maintenance.timer"
# What the last run found, for people and tools: `key=value` lines (result, time, host, alarms, detail,
# db_size_before, db_size_after); result is defragmented, skipped, alarm or failed. 0644: nothing secret.
STATUS_PATH = f"{STATE_DIR}/etcd-maintenance.status"
STATUS_KEYS = ("result", "time", "host", "alarms", "detail", "db_size_before", "db_size_after")
# Set to 1 (`systemctl set-environment`, or on the command line) to defragment now, whatever the last run did.
FORCE_VARIABLE = "KUBEADM_HA_DEFRAG_FORCE"
# The mutex's key prefix, in the cluster's own keyspace: kube-apiserver reads only its own prefix (/registry).
LOCK_NAME = "kubeadm-ha/etcd-defrag"
# etcdctl's --command-timeout bounds `defrag` as it bounds any request (etcdctl/ctlv3/command/defrag_command.go:
# `ctx, cancel := commandCtx(cmd)` around `c.Defragment(ctx, ep)`), so the 10 s every other call gets would cut
# off a defragmentation of a database of some GiB. Past it etcdctl stops waiting; etcd finishes regardless
# (server/etcdserver/api/v3rpc/maintenance.go `Defragment` ignores the request's context).
DEFRAG_TIMEOUT_SECONDS = 300
# The lock's session lease. A defragmenting member applies nothing (server/storage/backend/backend.go `defrag`
# holds the batch transaction's lock throughout) and, before etcd 3.7's FastLeaseKeepAlive, a leader renews a
# lease only once it has applied everything committed (server/etcdserver/v3_server.go `LeaseRenew`,
# `waitAppliedIndex`): the keep-alives of this very lock may stall while its holder defragments. So the lease
# outlives the longest defragmentation; a holder that died frees the lock after at most this long.
LOCK_TTL_SECONDS = DEFRAG_TIMEOUT_SECONDS + 60
# The longest a member may wait for the lock: another member's whole defragmentation, or its dead session's TTL.
LOCK_WAIT_SECONDS = LOCK_TTL_SECONDS + 30
# The whole locked run: the wait, the defragmentation, the unlock. `etcdctl lock` itself waits unbounded
# (etcdctl/ctlv3/command/lock_command.go: `m.Lock(ctx)` with a context only a signal cancels), so `timeout`
# ends it: ctr forwards the TERM (see render/backup.py `etcd_tool_functions`) and etcdctl gives up its place.
LOCKED_DEFRAG_SECONDS = LOCK_WAIT_SECONDS + DEFRAG_TIMEOUT_SECONDS + 30
# kha_etcdctl runs per run at most: alarm list (guard and body), member list, endpoint health, status twice.
_QUERIES = 6
# The unit's bound sits above the script's own, so the script's bounds end a slow run and it records why.
UNIT_TIMEOUT_SECONDS = (
    _QUERIES * (TOOL_TIMEOUT_SECONDS + KILL_AFTER_SECONDS) + LOCKED_DEFRAG_SECONDS + KILL_AFTER_SECONDS + 60
)
# Each member's hourly tick, in minutes past the hour: member 1 at :03, then every 8 minutes, so the 7 members
# either topology allows at most all get a minute of their own and never contend in a normal hour.
FIRST_MINUTE = 3
MINUTE_SPACING = 8
# A run writes its status a little after its tick; the tick `defragIntervalHours` later must see it as due.
DUE_MARGIN_MINUTES = 30
ALARM_EXIT = 3
# sd-daemon(3) priority prefixes: journald files a line starting with one at that priority (systemd.exec(5),
# SyslogLevelPrefix=, on by default), so `journalctl -p crit` finds the alarms.
CRIT, ERR, WARNING = "<2>", "<3>", "<4>"

_ALARM_ADVICE = (
    "etcd takes no writes until an operator has freed space (NOSPACE) or found the member that differs "
    "(CORRUPT) and disarmed it; this timer never disarms. See the README, etcd maintenance."
)

_SKIP_REASON = "a member serves nothing while it defragments, so every other one must be healthy"
_ALONE = "kubeadm-ha: a one-member etcd answers nothing while it defragments (seconds, for a small database)"


def tick_minute(index: int) -> int:
    """The minute past each hour at which member `index` (1-based) looks at its etcd."""
    return (FIRST_MINUTE + (index - 1) * MINUTE_SPACING) % 60


def _functions() -> tuple[str, ...]:
    fields = "".join(f"{key}=%s\\n" for key in STATUS_KEYS)
    return (
        *etcd_tool_functions(writable=()),
        # kha_status RESULT DETAIL: the status file, replaced whole.
        "kha_status() {",
        f'  printf {quote(fields)} "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$KUBEADM_HA_HOST"'
        ' "${raised:-}" "$2" "${before:-}" "${after:-}" >' + quote(STATUS_PATH + ".tmp"),
        "  " + shell("chmod", "0644", STATUS_PATH + ".tmp"),
        "  " + shell("mv", "-f", STATUS_PATH + ".tmp", STATUS_PATH),
        "  recorded=1",
        "}",
        # kha_fail CODE DETAIL: say why, record it, end the run with CODE.
        "kha_fail() {",
        f'  echo "{ERR}kubeadm-ha: etcd maintenance on ${{KUBEADM_HA_HOST}}: $2" >&2',
        '  kha_status failed "$2"',
        '  exit "$1"',
        "}",
        # Whatever else ends a run (an unexpected error, the ERR trap) is recorded too.
        "kha_status_on_exit() {",
        '  if [ "$1" -ne 0 ] && [ "${recorded:-1}" -eq 0 ]; then',
        f'    kha_status failed "exit $1: journalctl -u {SERVICE} says why" || true',
        "  fi",
        "}",
        # The alarm types raised anywhere in the cluster (every member lists them all), on one line; fails when
        # etcdctl cannot ask. etcdctl prints `memberID:<id> alarm:<TYPE>` per alarm (etcdctl/ctlv3/command/
        # printer_simple.go `Alarm`); the types are NOSPACE and CORRUPT (api/etcdserverpb/rpc.proto `AlarmType`).
        "kha_alarms() {",
        "  local listed",
        '  listed="$(kha_etcdctl alarm list)" || return 1',
        "  printf '%s\\n' \"$listed\" | sed -nE 's/.*alarm:([A-Z_]+).*/\\1/p' | sort -u | paste -sd ' ' -",
        "}",
        # The local member's database file in bytes (`endpoint status`, JSON field dbSize).
        "kha_db_size() {",
        "  local found",
        '  found="$(kha_etcdctl endpoint status --write-out=json)" || return 1',
        "  printf '%s\\n' \"$found\" | sed -nE 's/.*\"dbSize\":([0-9]+).*/\\1/p'",
        "}",
    )


def maintenance_script(host: str, interval_hours: int) -> Script:
    """What the timer runs on `host`: alarms, then (when due and every member is healthy) a locked defragmentation
    of the local member. Exit 0: defragmented, not due, or skipped; ALARM_EXIT: an alarm is raised; other: failed."""
    status = quote(STATUS_PATH)
    client = shell(*etcdctl_client_flags())
    due_minutes = max(interval_hours * 60 - DUE_MARGIN_MINUTES, 1)
    locked_defrag = (
        f"kha_etcd_tool {LOCKED_DEFRAG_SECONDS} etcdctl {client} lock --ttl={LOCK_TTL_SECONDS} {quote(LOCK_NAME)}"
        # After `--` the rest is the command etcdctl runs once it holds the lock (in the same container, from the
        # image's PATH), and releases the lock when it exits; its flags are its own, not the lock's.
        f" -- etcdctl {client} --command-timeout={DEFRAG_TIMEOUT_SECONDS}s defrag"
    )
    advice, skip = quote(_ALARM_ADVICE), quote(_SKIP_REASON)
    first_words = "cut -d ' ' -f 1 | paste -sd ' ' -"
    timed_out = (
        f"no defragmentation finished within {LOCKED_DEFRAG_SECONDS} s: another member held {LOCK_NAME} all along,"
        " or this one outlasted its bound (etcd then finishes it anyway; its log says when)"
    )
    return Script(
        step="etcd-maintenance",
        host=host,
        done_when=f'[ "${{{FORCE_VARIABLE}:-0}}" != 1 ]'
        f" && grep -qx result=defragmented {status} 2>/dev/null"
        f' && [ -n "$(find {status} -mmin -{due_minutes} -print -quit 2>/dev/null)" ]'
        ' && raised="$(kha_alarms)" && [ -z "$raised" ]',
        functions=_functions(),
        body=(
            "recorded=0 raised='' before='' after=''",
            "trap 'kha_status_on_exit $?' EXIT",
            'raised="$(kha_alarms)" || kha_fail 1 "etcdctl alarm list failed: is the local etcd member running?"',
            'if [ -n "$raised" ]; then',
            f'  echo "{CRIT}kubeadm-ha: etcd ALARM $raised raised (seen from ${{KUBEADM_HA_HOST}}):" {advice} >&2',
            '  kha_status alarm "alarm $raised raised; not defragmenting; not disarmed"',
            f"  exit {ALARM_EXIT}",
            "fi",
            'members="$(kha_etcdctl member list)" || kha_fail 1 "etcdctl member list failed"',
            'count="$(printf \'%s\\n\' "$members" | grep -c . || true)"',
            "unstarted=\"$(printf '%s\\n' \"$members\" | grep -c ', unstarted, ' || true)\"",
            # Exit 1 when any member is unhealthy; its lines say which.
            'health="$(kha_etcdctl endpoint health --cluster 2>&1)" || true',
            "healthy=\"$(printf '%s\\n' \"$health\" | grep -c ' is healthy: ' || true)\"",
            f"sick=\"$(printf '%s\\n' \"$health\" | grep ' is unhealthy: ' | {first_words} || true)\"",
            'if [ "$unstarted" -ne 0 ] || [ "$healthy" -lt "$count" ] || [ -n "$sick" ]; then',
            '  why="$healthy of $count members healthy (unhealthy: ${sick:-none}; unstarted: $unstarted)"',
            f'  echo "{WARNING}kubeadm-ha: skipped defragmenting the member on ${{KUBEADM_HA_HOST}}: $why;" {skip} >&2',
            "  printf '%s\\n' \"$health\" >&2",
            '  kha_status skipped "$why"',
            "  exit 0",
            "fi",
            'before="$(kha_db_size)" || kha_fail 1 "etcdctl endpoint status failed"',
            'if [ "$count" -eq 1 ]; then',
            f"  echo {quote(_ALONE)}",
            "fi",
            'echo "kubeadm-ha: all $count etcd members healthy; defragmenting the member on ${KUBEADM_HA_HOST}'
            ' (database $before bytes) once it holds the lock "' + quote(LOCK_NAME),
            "rc=0",
            f"{locked_defrag} || rc=$?",
            'case "$rc" in',
            "  0) ;;",
            # 124/137: `timeout` ended it (TERM, then KILL).
            f'  124 | 137) kha_fail "$rc" {quote(timed_out)} ;;',
            '  *) kha_fail "$rc" "etcdctl lock/defrag failed (exit $rc)" ;;',
            "esac",
            'after="$(kha_db_size)" || kha_fail 1 "etcdctl endpoint status failed after defragmenting"',
            'kha_status defragmented "database $before -> $after bytes"',
            'echo "kubeadm-ha: defragmented the etcd member on ${KUBEADM_HA_HOST}: database $before -> $after bytes"',
        ),
    )


def service_unit(host: str) -> str:
    description = f"kubeadm-ha: etcd alarms and defragmentation of the member of {host}"
    return etcd_tool_service(
        description, SCRIPT_PATH, UNIT_TIMEOUT_SECONDS, "SyslogIdentifier=kubeadm-ha-etcd-maintenance"
    )


def timer_unit(interval_hours: int, index: int) -> str:
    minute = tick_minute(index)
    return "\n".join(
        [
            "[Unit]",
            f"Description=kubeadm-ha: etcd alarms hourly at minute {minute}, defragmentation every {interval_hours} h",
            "",
            "[Timer]",
            # UTC: every member counts the same minutes, whatever a node's time zone.
            f"OnCalendar=*-*-* *:{minute:02d}:00 UTC",
            "AccuracySec=1min",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def maintenance_files(host: str, index: int, interval_hours: int) -> dict[str, tuple[str, int]]:
    """path -> (content, mode) of everything the timer needs on member `index` (1-based), `host`."""
    return {
        SCRIPT_PATH: (maintenance_script(host, interval_hours).render(), 0o700),
        f"{UNIT_DIR}/{SERVICE}": (service_unit(host), 0o644),
        f"{UNIT_DIR}/{TIMER}": (timer_unit(interval_hours, index), 0o644),
    }


def install_maintenance_timer_script(host: str, index: int, interval_hours: int) -> Script:
    """Write the maintenance script and units, then enable the timer; a changed interval rewrites them."""
    return timer_install_script("etcd-maintenance-timer", host, maintenance_files(host, index, interval_hours), TIMER)
