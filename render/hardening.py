"""What every control plane runs beyond kubeadm's defaults, and why (issue 20; the README's "Security").

Pure values: the flags kubeadm's ClusterConfiguration gives each static pod, the audit policy, the
volumes those need, and etcd's size and compaction flags. render/kubeadm.py puts them in the documents,
render/etcd.py in an external member's flags. Each setting names the CIS Kubernetes Benchmark check it
answers (v1.12, the version kube-bench v0.15.6 maps Kubernetes 1.34+ to), or the failure it prevents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import AuditConfig, EtcdMaintenanceConfig
from model.timing import EtcdTimingConfig, LeaderElectionConfig
from render import lb_config, yamldoc

AUDIT_POLICY_DIR = "/etc/kubernetes/audit"
AUDIT_POLICY_PATH = f"{AUDIT_POLICY_DIR}/policy.yaml"
# Where kube-apiserver reads its EncryptionConfiguration (render/encryption.py writes it).
ENCRYPTION_CONFIG_DIR = "/etc/kubernetes/encryption"
ENCRYPTION_CONFIG_PATH = f"{ENCRYPTION_CONFIG_DIR}/config.yaml"
ENCRYPTION_FLAG = "encryption-provider-config"

# kube-apiserver keeps serving this long after SIGTERM while its /readyz already fails, so every HAProxy takes
# it out of rotation (within BACKEND_OUT_OF_ROTATION_S, the hold-down the renewal step uses) before it stops
# listening: a manifest swap (`kubeadm upgrade`, a changed flag) then costs clients nothing. One more check
# interval of margin for a check that was in flight. kubelet's grace period for a static pod (30 s, the
# pod default) leaves the rest for in-flight requests to drain.
SHUTDOWN_DELAY_S = lb_config.BACKEND_OUT_OF_ROTATION_S + lb_config.BACKEND_CHECK_INTER_S


@dataclass(frozen=True)
class HostPathMount:
    """kubeadm v1beta4 `HostPathMount`: a host path mounted into a control-plane static pod."""

    name: str
    host_path: str
    mount_path: str
    read_only: bool
    path_type: str


@dataclass(frozen=True)
class Hardening:
    """The settings the documents are built with; `DEFAULT` is what a stack without the keys gets."""

    audit: AuditConfig = field(default_factory=AuditConfig)
    etcd: EtcdMaintenanceConfig = field(default_factory=EtcdMaintenanceConfig)
    leader_election: LeaderElectionConfig | None = None
    etcd_timing: EtcdTimingConfig | None = None


DEFAULT = Hardening()


def apiserver_args(settings: Hardening) -> tuple[tuple[str, str], ...]:
    audit = settings.audit
    return (
        # CIS 1.2.15: the profiling endpoints expose internals to anyone allowed /debug.
        ("profiling", "false"),
        # CIS 1.2.16-1.2.19: an audit trail of who did what, rotated by the API server itself.
        ("audit-policy-file", AUDIT_POLICY_PATH),
        ("audit-log-path", audit.log_path),
        ("audit-log-maxage", str(audit.max_age_days)),
        ("audit-log-maxbackup", str(audit.max_backups)),
        ("audit-log-maxsize", str(audit.max_size_mib)),
        # Bound service-account tokens expire when they say (1 h by default) instead of being silently
        # extended to a year for clients that do not reload them; every client this program deploys (client-go
        # in kube-proxy, CoreDNS, the CNIs) re-reads its projected token.
        ("service-account-extend-token-expiration", "false"),
        # Loses no request on a restart behind the load balancers (see SHUTDOWN_DELAY_S); once the delay is
        # over, a request still arriving on a kept-alive connection is answered 429 with Retry-After and the
        # connection closed, which clients retry, instead of a reset.
        ("shutdown-delay-duration", f"{SHUTDOWN_DELAY_S}s"),
        ("shutdown-send-retry-after", "true"),
        # CIS 1.2.5: logs, exec and port-forward verify the kubelet's serving certificate, which the kubelets ask
        # the cluster CA for (serverTLSBootstrap) and the program's approver lets through (render/csr_approval.py).
        # kubeadm's path of the cluster CA (render/kubeadm.py PKI_DIR).
        ("kubelet-certificate-authority", "/etc/kubernetes/pki/ca.crt"),
        # CIS 1.2.27-1.2.28: Secrets encrypted at rest (render/encryption.py).
        (ENCRYPTION_FLAG, ENCRYPTION_CONFIG_PATH),
    )


def apiserver_volumes(settings: Hardening) -> tuple[HostPathMount, ...]:
    return (
        HostPathMount(
            "audit-policy", AUDIT_POLICY_DIR, AUDIT_POLICY_DIR, read_only=True, path_type="DirectoryOrCreate"
        ),
        HostPathMount(
            "encryption-config",
            ENCRYPTION_CONFIG_DIR,
            ENCRYPTION_CONFIG_DIR,
            read_only=True,
            path_type="DirectoryOrCreate",
        ),
        HostPathMount(
            "audit-log", settings.audit.log_dir, settings.audit.log_dir, read_only=False, path_type="DirectoryOrCreate"
        ),
    )


def controller_manager_args(settings: Hardening) -> tuple[tuple[str, str], ...]:
    return (("profiling", "false"), *_leader_election_args(settings))  # CIS 1.3.2


def scheduler_args(settings: Hardening) -> tuple[tuple[str, str], ...]:
    return (("profiling", "false"), *_leader_election_args(settings))  # CIS 1.4.1


def _leader_election_args(settings: Hardening) -> tuple[tuple[str, str], ...]:
    """The lease flags both components take (component-base v0.37.2 config/options/leaderelectionconfig.go);
    none when the stack leaves them unset, so existing documents stay byte-identical."""
    timing = settings.leader_election
    if timing is None:
        return ()
    return (
        ("leader-elect-lease-duration", f"{timing.lease_duration_seconds}s"),
        ("leader-elect-renew-deadline", f"{timing.renew_deadline_seconds}s"),
        ("leader-elect-retry-period", f"{timing.retry_period_seconds}s"),
    )


def etcd_args(settings: EtcdMaintenanceConfig, timing: EtcdTimingConfig | None) -> tuple[tuple[str, str], ...]:
    """etcd's size limit and its own compaction, and its Raft timing when the stack sets it (stacked: kubeadm's
    etcd.local.extraArgs; external: the member's flags). Beyond the quota etcd raises NOSPACE and takes only
    reads and deletes."""
    return (
        ("quota-backend-bytes", str(settings.quota_backend_bytes)),
        ("auto-compaction-mode", settings.auto_compaction_mode),
        ("auto-compaction-retention", settings.auto_compaction_retention),
        *_etcd_timing_args(timing),
    )


# The flags `etcd.timing` sets (etcd v3.7.0 embed/config.go AddFlags, in milliseconds). Without the key none is
# given, and the settings step takes them out of a stacked member's manifest that still has them.
HEARTBEAT_FLAG, ELECTION_FLAG = ETCD_TIMING_FLAGS = ("heartbeat-interval", "election-timeout")


def _etcd_timing_args(timing: EtcdTimingConfig | None) -> tuple[tuple[str, str], ...]:
    if timing is None:
        return ()
    return ((HEARTBEAT_FLAG, str(timing.heartbeat_interval_ms)), (ELECTION_FLAG, str(timing.election_timeout_ms)))


# Sensitive resources first, so that no later, broader rule can ever log their bodies: Secrets and ConfigMaps
# hold credentials, TokenRequests and TokenReviews carry bearer tokens in their bodies.
_SENSITIVE = (
    {"group": "", "resources": ["secrets", "configmaps", "serviceaccounts/token"]},
    {"group": "authentication.k8s.io", "resources": ["tokenreviews"]},
    {"group": "authorization.k8s.io", "resources": ["subjectaccessreviews", "selfsubjectaccessreviews"]},
)


def audit_policy() -> str:
    """Who did what to which object and when, at Metadata level: never a request or response body."""
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        # One event per request (ResponseComplete), not two.
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "Metadata", "resources": [dict(item) for item in _SENSITIVE]},
            # Each load balancer polls /readyz every two seconds; those say nothing about anyone.
            {
                "level": "None",
                "nonResourceURLs": ["/readyz", "/readyz/*", "/livez", "/livez/*", "/healthz", "/healthz/*"],
            },
            {"level": "Metadata"},
        ],
    }
    return yamldoc.dump(policy)
