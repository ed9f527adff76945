"""kubeadm-ha: load and validate the stack config, build the cluster, export what operators need."""

import pulumi

from components.backup import ETCD_BACKUPS_OUTPUT, HOST_KEYS_OUTPUT
from components.certificates import CERTIFICATE_RENEWALS_OUTPUT, CERTIFICATES_EXPIRE_OUTPUT
from components.cluster import build_cluster
from components.promotion import enforce_promotion_gate
from model.previous import (
    DEPLOYMENT_ID_OUTPUT,
    ETCD_IMAGE_TAG_OUTPUT,
    ETCD_INITIAL_MEMBERS_OUTPUT,
    ETCD_MEMBERS_OUTPUT,
    ETCD_TOPOLOGY_OUTPUT,
    KUBERNETES_VERSION_OUTPUT,
    NETWORK_MODE_OUTPUT,
    SECRETS_ENCRYPTION_KEYS_OUTPUT,
    SECRETS_ENCRYPTION_OUTPUT,
    read_previous_deployment,
)
from model.release import (
    PROGRAM_DIGEST_OUTPUT,
    PROMOTION_OUTPUT,
    RELEASE_OUTPUT,
    program_digest,
    program_root,
    release_of,
)
from model.stack import load_stack_config

previous = read_previous_deployment()
config = load_stack_config(pulumi.get_stack(), previous)
release, digest = release_of(config), program_digest(program_root())
# Before any cluster resource: a release the promotion source does not run is refused here.
promotion = enforce_promotion_gate(
    config, stack=pulumi.get_stack(), release=release, digest=digest, deployed=previous.outputs
)
cluster = build_cluster(config, previous)

pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("apiEndpoint", cluster.api_endpoint)
pulumi.export("nodes", cluster.nodes)
pulumi.export("sshUser", cluster.ssh_user)
pulumi.export("sshPrivateKey", cluster.ssh_private_key)
# Read back by the next run (model/previous.py) to judge upgrades and topology changes.
pulumi.export(KUBERNETES_VERSION_OUTPUT, cluster.kubernetes_version)
pulumi.export(ETCD_TOPOLOGY_OUTPUT, config.etcd.topology)
pulumi.export(NETWORK_MODE_OUTPUT, config.network.mode)
pulumi.export(DEPLOYMENT_ID_OUTPUT, cluster.deployment_id)
# For the operator tools (tools/etcd_backup.py, tools/etcd_restore.py, tools/drill.py): pinned host keys, snapshots.
pulumi.export(HOST_KEYS_OUTPUT, cluster.host_keys)
pulumi.export(ETCD_BACKUPS_OUTPUT, cluster.etcd_backups)
# Read back by the next run to decide which control planes' certificates are due (components/certificates.py).
pulumi.export(CERTIFICATES_EXPIRE_OUTPUT, cluster.certificates_expire)
pulumi.export(CERTIFICATE_RENEWALS_OUTPUT, cluster.certificate_renewals)
pulumi.export(SECRETS_ENCRYPTION_OUTPUT, cluster.secrets_encryption)
pulumi.export(SECRETS_ENCRYPTION_KEYS_OUTPUT, cluster.secrets_encryption_keys)
if cluster.etcd_initial_members is not None:
    # Which members bootstrapped the external etcd cluster (forever), and which are planned now.
    pulumi.export(ETCD_INITIAL_MEMBERS_OUTPUT, list(cluster.etcd_initial_members))
    pulumi.export(ETCD_MEMBERS_OUTPUT, list(cluster.etcd_members or ()))
    pulumi.export(ETCD_IMAGE_TAG_OUTPUT, cluster.etcd_image_tag)
# Read by the next stack in the promotion chain; published only once every step of this run has finished.
pulumi.export(RELEASE_OUTPUT, cluster.finished.apply(lambda _: release))
pulumi.export(PROGRAM_DIGEST_OUTPUT, cluster.finished.apply(lambda _: digest))
if promotion is not None:
    pulumi.export(PROMOTION_OUTPUT, promotion)
