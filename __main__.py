"""kubeadm-ha: load and validate the stack config, build the cluster, export what operators need."""

import pulumi

from components.cluster import build_cluster
from components.config import load_stack_config

config = load_stack_config(pulumi.get_stack())
cluster = build_cluster(config)

pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("apiEndpoint", cluster.api_endpoint)
pulumi.export("nodes", cluster.nodes)
pulumi.export("sshUser", cluster.ssh_user)
pulumi.export("sshPrivateKey", cluster.ssh_private_key)
