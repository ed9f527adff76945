"""The whole lifecycle as one ordered list of phases; each phase is a component."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pulumi

from components.artifacts import stack_bundle
from components.backup import BackupTarget, EtcdBackups, EtcdBackupsArgs, backup_locations
from components.certificates import (
    CertificateRenewal,
    CertificateRenewalArgs,
    RenewalTarget,
    certificate_expiries,
    plan_renewals,
)
from components.control_plane import ControlPlaneNode, ControlPlaneNodeArgs
from components.control_plane_config import ControlPlaneSettings, ControlPlaneSettingsArgs, SettingsTarget
from components.csr_approval import KubeletServingApproval, KubeletServingApprovalArgs
from components.encryption import SecretsEncryption, SecretsEncryptionArgs
from components.etcd import EtcdCluster, EtcdClusterArgs, plan_membership
from components.etcd_maintenance import EtcdMaintenance, EtcdMaintenanceArgs
from components.loadbalancer import LoadBalancer, LoadBalancerArgs
from components.node_files import FilesTarget, NodeFiles, NodeFilesArgs
from components.nodes import NodeContext, StepTarget
from components.pki import ADMIN_USER, APISERVER_ETCD_CLIENT, ETCD_CA, ClusterPki, ClusterPkiArgs
from components.remote import secret
from components.upgrade import KubernetesUpgrade, KubernetesUpgradeArgs
from components.vm import Hypervisor, deployment_id
from components.worker_pool import WorkerPool, WorkerPoolArgs
from model.addressing import AddressPlan, plan_addresses
from model.config import ClusterConfig
from model.placement import placement_findings, plan_placement
from model.previous import NEW_STACK, PreviousDeployment
from render.etcd import EtcdClusterSpec
from render.hardening import Hardening
from render.kubeadm import ClusterShape, ExternalEtcd, renewal_document
from render.kubeconfig import render_kubeconfig


@dataclass(frozen=True)
class ClusterOutputs:
    kubeconfig: pulumi.Output[str]
    api_endpoint: str
    nodes: dict[str, dict[str, str]]
    ssh_user: str
    ssh_private_key: pulumi.Output[str]
    kubernetes_version: pulumi.Output[str]
    # Resolves once every remote step of this run has finished (unknown in preview): what the release waits for.
    finished: pulumi.Output[bool]
    # External etcd only: re-exported for the next run, which judges membership changes by them.
    etcd_initial_members: tuple[str, ...] | None = None
    etcd_members: tuple[str, ...] | None = None
    etcd_image_tag: str | None = None
    deployment_id: pulumi.Output[str] | None = None
    # hostname -> the node's pinned SSH host public key, for the tools (tools/access.py).
    host_keys: dict[str, pulumi.Output[str]] | None = None
    # Where each etcd member keeps its snapshots (components/backup.py).
    etcd_backups: dict[str, object] | None = None
    # hostname -> earliest certificate expiry, and each control plane's renewal generation (components/certificates.py).
    certificates_expire: pulumi.Output[dict[str, str | None]] | None = None
    certificate_renewals: dict[str, int] | None = None
    # The key generation Secrets are encrypted with, once every control plane has moved to it.
    secrets_encryption: pulumi.Output[dict[str, object]] | None = None
    secrets_encryption_keys: pulumi.Output[dict[str, str]] | None = None


def cluster_shape(config: ClusterConfig, plan: AddressPlan, etcd: EtcdClusterSpec | None = None) -> ClusterShape:
    external = None
    if etcd is not None:
        external = ExternalEtcd(
            endpoints=etcd.client_urls,
            ca_file=ETCD_CA.cert_path,
            cert_file=APISERVER_ETCD_CLIENT.cert_path,
            key_file=APISERVER_ETCD_CLIENT.key_path,
        )
    return ClusterShape(
        cluster_name=config.cluster_name,
        kubernetes_version=config.kubernetes.version,
        endpoint_host=str(plan.vip),
        endpoint_port=config.load_balancer.port,
        pod_subnet=str(config.kubernetes.pod_subnet),
        service_subnet=str(config.kubernetes.service_subnet),
        extra_sans=(f"api.{config.cluster_name}.{config.network.domain}",),
        external_etcd=external,
        hardening=Hardening(
            audit=config.audit,
            etcd=config.etcd.maintenance,
            leader_election=config.control_plane.leader_election,
            etcd_timing=config.etcd.timing,
        ),
    )


def build_cluster(config: ClusterConfig, last_deployment: PreviousDeployment = NEW_STACK) -> ClusterOutputs:
    plan = plan_addresses(config)
    # 0. The artifact bundle, when the stack installs from one: read and checked before any resource exists.
    bundle = stack_bundle(config)
    etcd_spec = plan_membership(config, plan, last_deployment) if config.etcd.external else None
    shape = cluster_shape(config, plan, etcd_spec)

    # 1. Keys and certificates, generated once and shared by every control plane (and the etcd members').
    pki = ClusterPki(
        "pki",
        ClusterPkiArgs(
            config.cluster_name,
            [node.hostname for node in plan.nodes],
            etcd_members=plan.etcd_members,
            early_renewal_hours=config.certificates.renew_before_days * 24,
        ),
    )
    # 2. Per hypervisor: the NAT network (nat mode) and the base image; volume names carry this deployment's id.
    deployment = deployment_id(last_deployment, parent=pki)
    hypervisors = {
        hypervisor.name: Hypervisor(hypervisor.name, hypervisor, config, deployment)
        for hypervisor in config.hypervisors
    }
    placement = plan_placement(config, last_deployment)
    # With `placement: strict` config validation has refused these already.
    _, fragile = placement_findings(config, last_deployment)
    if fragile:
        pulumi.log.warn(
            "this cluster does not survive the loss of one hypervisor:\n"
            + "\n".join(f"  - {finding.path}: {finding.rule}" for finding in fragile)
            + "\nSet placement: strict to refuse such a configuration."
        )
    context = NodeContext(config, plan, pki, hypervisors, placement, bundle=bundle)
    # The keys that encrypt Secrets at rest; a raised `encryption.rotation` moves the cluster to a new one.
    encryption = SecretsEncryption(
        "secrets-encryption",
        SecretsEncryptionArgs(
            config.encryption.rotation,
            last_deployment.encryption_generation,
            last_deployment.encryption_moved_from,
            cluster_exists=last_deployment.exists,
        ),
    )
    # 3. The API endpoint: HAProxy (+ keepalived) in front of every control plane.
    load_balancer = LoadBalancer("api-lb", LoadBalancerArgs(context))
    before_init: list[pulumi.Resource] = [*load_balancer.configured]
    # 4. External etcd: its own members, healthy as a cluster before any API server needs it.
    if etcd_spec is not None:
        etcd = EtcdCluster("etcd", EtcdClusterArgs(context, etcd_spec))
        before_init.append(etcd.ready)
    # 5. `kubeadm init` on the first control plane, once the endpoint answers and its PKI is placed.
    first, *others = plan.control_planes
    secrets_files = encryption.bootstrap_files()
    initial = ControlPlaneNode(
        first.hostname, ControlPlaneNodeArgs(context, first, shape, "init", after=before_init, files=secrets_files)
    )
    # 6. The pod network, from the first control plane.
    cni = initial.apply_cni(context)
    bootstrapped = [initial.kubeadm] + ([cni] if cni is not None else [])
    # 7. The other control planes join strictly one after another, each once the previous is Ready:
    #    parallel joins race inside etcd, and the same chain makes removals go one at a time, in reverse.
    previous = bootstrapped[-1]
    control_planes = [initial]
    for node in others:
        joined = ControlPlaneNode(
            node.hostname, ControlPlaneNodeArgs(context, node, shape, "join", after=[previous], files=secrets_files)
        )
        control_planes.append(joined)
        previous = joined.membership or joined.kubeadm
    if len(control_planes) > 1:
        initial.attach_admin(context, control_planes[1])
    # 8. Workers join in parallel as soon as the first control plane and the pod network are up.
    workers = WorkerPool("workers", WorkerPoolArgs(context, plan.workers, shape, after=bootstrapped, admin=first))
    # 9. A Kubernetes upgrade, only in a run that raises the version: in the order kubeadm requires.
    upgrade = None
    if last_deployment.kubernetes_version not in (None, config.kubernetes.version):
        upgrade = KubernetesUpgrade(
            f"upgrade-{config.kubernetes.version}",
            KubernetesUpgradeArgs(context, control_planes, admin=first, after=[previous, *bootstrapped]),
        )

    # 10. Kubelet serving certificates from the cluster CA: a kubelet set up before serverTLSBootstrap moved to
    #     it, an approver timer on every control plane for the planned kubelets' CSRs (they rotate long after any
    #     `pulumi up`), and one step until each planned kubelet serves one; only then does kube-apiserver verify
    #     them (its --kubelet-certificate-authority, from the settings below).
    kubelets = [StepTarget(cp.node, cp.vm, cp.kubeadm) for cp in control_planes]
    kubelets += [StepTarget(node, workers.vms[node.hostname], workers.joins[node.hostname]) for node in plan.workers]
    kubelet_serving = KubeletServingApproval(
        "kubelet-serving",
        KubeletServingApprovalArgs(
            context,
            kubelets[: len(control_planes)],
            nodes=[*plan.control_planes, *plan.workers],
            kubelets=kubelets,
            after=[
                *bootstrapped,
                *(step for cp in control_planes for step in (cp.kubeadm, cp.membership) if step is not None),
                *workers.joins.values(),
                *workers.memberships.values(),
                *([upgrade] if upgrade is not None else []),
            ],
        ),
    )
    # 11. The program's settings on every running control plane, one at a time (new ones already have them),
    #     inside the four phases that move Secrets to this run's encryption key (components/encryption.py).
    settings_targets = [SettingsTarget(cp.node, cp.vm, cp.kubeadm) for cp in control_planes]
    joined_and_upgraded = [
        previous,
        *bootstrapped,
        *([upgrade] if upgrade is not None else []),
        kubelet_serving.approved,
    ]
    added = encryption.phase(context, settings_targets, "add", after=joined_and_upgraded)
    settings = ControlPlaneSettings(
        "control-plane-settings",
        ControlPlaneSettingsArgs(context, settings_targets, shape, after=[*joined_and_upgraded, *added[-1:]]),
    )
    promoted = encryption.phase(context, settings_targets, "promote", after=list(settings.steps.values())[-1:])
    rewritten = encryption.rewrite(context, settings_targets[0], after=promoted[-1:])
    dropped = encryption.phase(context, settings_targets, "drop", after=[rewritten])
    encryption_steps = [*added, *promoted, rewritten, *dropped]

    # 12. File modes and owners on every node (again after an upgrade, which rewrites the kubelet's files).
    files_targets = [FilesTarget(cp.node, cp.vm, cp.kubeadm, etcd_member=etcd_spec is None) for cp in control_planes]
    files_targets += [
        FilesTarget(node, workers.vms[node.hostname], workers.joins[node.hostname], False) for node in plan.workers
    ]
    if etcd_spec is not None:
        files_targets += [
            FilesTarget(node, etcd.vms[node.hostname], etcd.members[node.hostname], True) for node in plan.etcd_members
        ]
    node_files = NodeFiles("node-files", NodeFilesArgs(context, files_targets, after=[upgrade] if upgrade else []))
    # 13. An etcd snapshot timer on every member: the control planes, or the external etcd VMs.
    if etcd_spec is None:
        targets = [BackupTarget(cp.node, cp.vm, cp.kubeadm) for cp in control_planes]
    else:
        by_name = {node.hostname: node for node in plan.etcd_members}
        targets = [BackupTarget(by_name[name], etcd.vms[name], step) for name, step in etcd.members.items()]
    backups = EtcdBackups("etcd-backup", EtcdBackupsArgs(context, targets))
    # Alarms hourly and a defragmentation every defragIntervalHours, on the same members, one at a time.
    maintenance = EtcdMaintenance("etcd-maintenance", EtcdMaintenanceArgs(context, targets))
    # 14. kubeadm's certificates on every control plane, one node at a time, renewed within renewBeforeDays.
    renewals = plan_renewals(
        [cp.node.hostname for cp in control_planes],
        last_deployment.outputs,
        config.certificates.renew_before_days,
        datetime.datetime.now(datetime.UTC),  # the step's guard counts in UTC seconds too (`date -u +%s`)
    )
    renewal = CertificateRenewal(
        "certificates",
        CertificateRenewalArgs(
            context,
            [RenewalTarget(cp.node, cp.vm, cp.kubeadm) for cp in control_planes],
            renewals,
            stacked_etcd=etcd_spec is None,
            cluster_config=renewal_document(shape),
            after=[*bootstrapped, *([upgrade] if upgrade is not None else []), *dropped[-1:]],
        ),
    )

    # The last step of every chain: each other step is upstream of one of them.
    last_steps: list[pulumi.CustomResource] = [*load_balancer.configured, *bootstrapped]
    last_steps += [step for node in control_planes for step in (node.kubeadm, node.membership) if step is not None]
    last_steps += [*workers.joins.values(), *workers.memberships.values()]
    if etcd_spec is not None:
        last_steps.append(etcd.ready)
    last_steps += backups.installed.values()
    last_steps += maintenance.installed.values()
    last_steps += settings.steps.values()
    last_steps += node_files.steps.values()
    last_steps += encryption_steps
    last_steps += renewal.steps.values()
    last_steps += kubelet_serving.steps
    kubernetes_version = (
        upgrade.completed_version if upgrade is not None else pulumi.Output.from_input(config.kubernetes.version)
    )
    finished = pulumi.Output.all(kubernetes_version, *(step.id for step in last_steps)).apply(lambda _: True)

    server = f"https://{load_balancer.endpoint}"
    kubeconfig = secret(
        pulumi.Output.all(pki.cluster_ca.cert_pem, pki.admin_cert.cert_pem, pki.admin_key.private_key_pem).apply(
            lambda pems: render_kubeconfig(
                cluster_name=config.cluster_name,
                server=server,
                ca_pem=pems[0],
                cert_pem=pems[1],
                key_pem=pems[2],
                user=ADMIN_USER,
            )
        )
    )
    return ClusterOutputs(
        kubeconfig=kubeconfig,
        api_endpoint=server,
        nodes={
            node.hostname: {
                "address": str(node.address),
                "mac": node.mac,
                "role": node.role,
                "hypervisor": placement[node.hostname],
            }
            for node in plan.nodes
        },
        ssh_user=config.ssh.user,
        ssh_private_key=pki.operator_private_key,
        # Published only once every upgrade step is done: a failed upgrade is resumed by the next run.
        kubernetes_version=kubernetes_version,
        finished=finished,
        etcd_initial_members=etcd_spec.initial_members if etcd_spec is not None else None,
        etcd_members=tuple(member.name for member in etcd_spec.members) if etcd_spec is not None else None,
        etcd_image_tag=etcd_spec.image.rsplit(":", 1)[1] if etcd_spec is not None else None,
        deployment_id=deployment,
        host_keys={node.hostname: pki.host_public_key(node.hostname) for node in plan.nodes},
        etcd_backups=backup_locations(config, [target.node.hostname for target in targets]),
        certificates_expire=certificate_expiries(renewal, pki),
        certificate_renewals={host: plan.generation for host, plan in renewals.items()},
        secrets_encryption=encryption.record(encryption_steps),
        secrets_encryption_keys=encryption.keys_output(),
    )


__all__ = ["ClusterOutputs", "build_cluster", "cluster_shape"]
