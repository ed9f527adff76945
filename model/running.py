"""Rules against the running cluster: what the last deployment's outputs allow this configuration to change.

A running node never changes address, MAC or hypervisor; Kubernetes moves one minor at a time; etcd keeps its
topology and image. The last deployment is read by model/previous.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import re

from model.addressing import plan_addresses
from model.config import VERSION_PATTERN, ClusterConfig
from model.placement import placement_findings
from model.previous import NEW_STACK, PreviousDeployment
from model.rules import Problem
from model.versions import RELEASES, next_minor, release_for


def etcd_image_tag(config: ClusterConfig, previous: PreviousDeployment = NEW_STACK) -> str:
    """The `registry.k8s.io/etcd` tag external etcd members run.

    Explicit `etcd.version` wins; otherwise a running cluster keeps the tag it runs (a Kubernetes upgrade
    does not roll etcd behind the operator's back), and a new one starts on the tag kubeadm pins for its
    minor (model/versions.py).
    """
    if config.etcd.version is not None:
        return config.etcd.version
    if previous.etcd_image_tag is not None:
        return previous.etcd_image_tag
    return release_for(config.kubernetes.version).etcd_image_tag


def end_of_life_problems(config: ClusterConfig, previous: PreviousDeployment, today: datetime.date) -> list[Problem]:
    """A new cluster may not start on a minor upstream no longer patches; a running one may stay and upgrade."""
    if previous.kubernetes_version is not None:
        return []
    release = release_for(config.kubernetes.version)
    if release.end_of_life >= today:
        return []
    following = next_minor(release.minor)
    advice = f"start on {following} ({RELEASES[following].latest_patch})" if following else "start on a newer minor"
    return [
        Problem(
            "kubernetes.version",
            f"Kubernetes {release.minor} reached end of life on {release.end_of_life.isoformat()}; a new cluster must "
            f"{advice}. Running clusters on {release.minor} may stay and upgrade from it.",
        )
    ]


def version_tuple(version: str) -> tuple[int, int, int]:
    match = VERSION_PATTERN.match(version)
    if not match:
        raise ValueError(f"{version!r} is not a MAJOR.MINOR.PATCH version")
    return int(match[1]), int(match[2]), int(match[3])


def address_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """No running node may change address or MAC, and the API endpoint may not move.

    terraform-provider-libvirt 0.8.1 applies a NIC change to a running domain in place without touching the
    guest, so the guest keeps its old address while every step dials the new one (and keepalived could
    raise a VIP another node still holds). Each problem names the key whose change caused it.
    """
    problems: list[Problem] = []
    plan = plan_addresses(config)
    endpoint = f"https://{config.vip}:{config.load_balancer.port}"
    if previous.api_endpoint is not None and previous.api_endpoint != endpoint:
        problems.append(
            Problem(
                "loadBalancer.vip" if str(config.vip) not in previous.api_endpoint else "loadBalancer.port",
                f"the running cluster's API endpoint is {previous.api_endpoint}; this config makes it {endpoint}. "
                "Every certificate, kubeconfig and kubelet names the endpoint, so it cannot move under a running "
                "cluster (build a new stack instead)",
            )
        )
    running = previous.node_addresses
    for node in plan.nodes:
        if node.hostname not in running:
            continue
        address, mac = running[node.hostname]
        if address == str(node.address) and mac in (None, node.mac):
            continue
        if node.role == "lb" and ipaddress.IPv4Address(address) in config.network.cidr:
            path = "loadBalancer.replicas"
            remedy = (
                "a lone load balancer owns the VIP as its own address while several share it through keepalived, "
                "so lb-1 cannot go from one to the other in place; keep the count on the same side of 1, or "
                "build a new stack"
            )
        else:
            path = "network.cidr"
            remedy = "the network of a running cluster cannot change; keep it, or build a new stack"
        problems.append(
            Problem(
                path,
                f"node {node.hostname} runs at {address} ({mac or 'MAC as planned'}); this config would move it to "
                f"{node.address} ({node.mac}). A running node never changes address or MAC: libvirt would update "
                f"its NIC in place while the guest kept its old address. {remedy}",
            )
        )
    return problems


def placement_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """Running VMs whose hypervisor is gone; with `placement: strict`, also a host loss the cluster does not survive."""
    refused, fragile = placement_findings(config, previous)
    problems = [Problem(finding.path, finding.rule) for finding in refused]
    if config.placement == "strict":
        problems += [Problem(finding.path, f"{finding.rule} (placement: strict)") for finding in fragile]
    return problems


def change_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """Rules about changing a running cluster, judged against the last deployment's outputs."""
    problems: list[Problem] = address_problems(config, previous) + placement_problems(config, previous)
    if previous.domains_without_key_disk:
        hosts = ", ".join(previous.domains_without_key_disk)
        problems.append(
            Problem(
                "nodes",
                f"{hosts} run on domains made without a key disk, by a program from before the SSH host private "
                "key left cloud-init (the libvirt provider logs user-data; README: security notes). Adding the disk "
                "replaces each of those domains (terraform-provider-libvirt 0.8.1: `disk` is ForceNew), all in one "
                "run, and with them every step of every node: each would be drained, reset and joined again at "
                "once. This program has no rolling migration yet: keep running this stack from the revision it "
                "was deployed with (`python -m tools.promote STACK --find-revision` lists it)",
            )
        )
    generation = previous.encryption_generation
    moving = previous.exists and generation != config.encryption.rotation
    if moving and previous.node_names is not None:
        planned = {node.hostname for node in plan_addresses(config).control_planes}
        added = sorted(planned - set(previous.node_names))
        if added:
            source = "no encryption" if generation is None else f"key generation {generation}"
            problems.append(
                Problem(
                    "encryption.rotation",
                    f"moving Secrets from {source} to generation {config.encryption.rotation} while control planes "
                    f"are added ({', '.join(added)}); one change at a time: a control plane joining mid-move would "
                    "hold only the new key while the others still write with the old one",
                )
            )
    if generation is not None and config.encryption.rotation < generation:
        problems.append(
            Problem(
                "encryption.rotation",
                f"the cluster's Secrets are encrypted with key generation {generation}; going back to "
                f"{config.encryption.rotation} would rotate to a key that has already been retired. Rotation only "
                f"moves forward: set it to {generation} (no change) or higher (a new key)",
            )
        )
    if previous.network_mode is not None and previous.network_mode != config.network.mode:
        problems.append(
            Problem(
                "network.mode",
                f"the cluster runs on network.mode {previous.network_mode}; switching a running node's NIC to "
                f"{config.network.mode} would leave its guest with the other mode's addressing (cloud-init sets "
                "the network up at first boot only): build a new stack instead",
            )
        )
    if previous.etcd_topology and previous.etcd_topology != config.etcd.topology:
        problems.append(
            Problem(
                "etcd.topology",
                f"the cluster runs {previous.etcd_topology} etcd; changing it to {config.etcd.topology} would need "
                "its data migrated between etcd clusters, which this program does not do (build a new stack instead)",
            )
        )
    if config.etcd.external and previous.etcd_initial_members:
        # Membership is derived from hostnames; names of another cluster mean the names changed under a live etcd.
        pattern = re.compile(rf"^{re.escape(config.cluster_name)}-etcd-[1-9][0-9]*$")
        strangers = [name for name in previous.etcd_initial_members if not pattern.match(name)]
        if strangers:
            problems.append(
                Problem(
                    "clusterName",
                    f"the running etcd cluster's initial members {strangers} are not named "
                    f"{config.cluster_name}-etcd-N; renaming a cluster would rename every etcd member, "
                    "which this program does not do",
                )
            )
    if previous.kubernetes_version:
        running = version_tuple(previous.kubernetes_version)
        wanted = version_tuple(config.kubernetes.version)
        if wanted < running:
            problems.append(
                Problem(
                    "kubernetes.version",
                    f"{config.kubernetes.version} is older than the running {previous.kubernetes_version}; "
                    "kubeadm does not support downgrades",
                )
            )
        elif wanted[:2] > (running[0], running[1] + 1):
            problems.append(
                Problem(
                    "kubernetes.version",
                    f"{config.kubernetes.version} skips a minor version from the running {previous.kubernetes_version};"
                    f" kubeadm upgrades one minor at a time (go to {running[0]}.{running[1] + 1}.x first)",
                )
            )
        elif wanted != running and previous.node_names is not None:
            planned = {node.hostname for node in plan_addresses(config).nodes}
            if planned != set(previous.node_names):
                problems.append(
                    Problem(
                        "kubernetes.version",
                        f"upgrading to {config.kubernetes.version} while nodes are added or removed; one change at a "
                        "time: a node joining mid-upgrade would get a version the control plane does not run yet",
                    )
                )
    return problems
