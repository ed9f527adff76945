"""kubeadm-ha: load and validate the stack config, build the cluster, export what operators need."""

import pulumi

from components.cluster import build_cluster
from components.config import load_stack_config
from components.previous import ETCD_TOPOLOGY_OUTPUT, KUBERNETES_VERSION_OUTPUT

config = load_stack_config(pulumi.get_stack())
cluster = build_cluster(config)

pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("apiEndpoint", cluster.api_endpoint)
pulumi.export("nodes", cluster.nodes)
pulumi.export("sshUser", cluster.ssh_user)
pulumi.export("sshPrivateKey", cluster.ssh_private_key)
# Read back by the next run (components/previous.py) to judge upgrades and topology changes.
pulumi.export(KUBERNETES_VERSION_OUTPUT, config.kubernetes.version)
pulumi.export(ETCD_TOPOLOGY_OUTPUT, config.etcd.topology)
