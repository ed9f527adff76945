"""ControlPlaneNode: a control-plane VM, the shared PKI placed on it, then `kubeadm init` or `join`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_command as command

from components.artifacts import bundled_cni_manifest
from components.control_plane_config import settings_files
from components.membership import admin_for, membership_step, node_removal_step, reset_step, token_step
from components.nodes import NodeContext
from components.pki import ETCD_CA
from components.pki_placement import PlacedPki, keys_present, pki_bundle, place_pki_script, placed_key_paths
from components.remote import run_step, secret
from components.vm import Vm, VmSize
from model.addressing import NodePlan
from render.cni import cni_script, manifest_for
from render.kubeadm import INIT_CONFIG_PATH, JOIN_CONFIG_PATH, ClusterShape, init_documents, join_documents
from render.node_prep import kubernetes_node_preparation
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    STATE_DIR,
    BundleFile,
    Script,
    encode_bundle,
    logged,
    quote,
)
from render.scripts import command as shell

KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
# The program's record of `kubeadm init`/`join` on a node: STARTED ("init" or "join") just before kubeadm runs,
# renamed to DONE once it succeeded. kubelet.conf alone cannot tell: kubeadm writes it early (init: the
# kubeconfig phase; join: kubelet-start), before wait-control-plane or control-plane-join, and a failed create
# records nothing, so the next `pulumi up` runs the step again. The cluster lab saw an init that missed its
# wait-control-plane deadline taken as done. Nodes from before the record have kubelet.conf and neither file.
BOOTSTRAP_STARTED = f"{STATE_DIR}/kubeadm-bootstrap.started"
BOOTSTRAP_DONE = f"{STATE_DIR}/kubeadm-bootstrap.done"
BOOTSTRAP_FINISHED = f"[ -f {BOOTSTRAP_DONE} ] || {{ [ -f {KUBELET_KUBECONFIG} ] && [ ! -e {BOOTSTRAP_STARTED} ]; }}"


def _bootstrap(kind: Literal["init", "join"], *kubeadm: str) -> list[str]:
    """Run kubeadm between the two records."""
    return [
        f"printf '%s\\n' {kind} >{BOOTSTRAP_STARTED}",
        logged(f"kubeadm-{kind}", "kubeadm", *kubeadm),
        shell("mv", "-f", BOOTSTRAP_STARTED, BOOTSTRAP_DONE),
    ]


# A join that stopped halfway may have added this node's etcd member; kubeadm cannot take it up again.
_UNFINISHED_JOIN = (
    '"kubeadm-ha: a kubeadm join on ${KUBEADM_HA_HOST} started and did not finish'
    " (see ${KUBEADM_HA_LOG_DIR}/kubeadm-join.log); kubeadm cannot resume a join. Run kubeadm reset --force on"
    ' the node"'
)
_OR_REPLACE = ", or replace its VM (pulumi up --replace with the domain's URN), then pulumi up again"


def _unfinished(init: list[str] | None, *, worker: bool = False, pki: PlacedPki | None = None) -> list[str]:
    """What a step does when STARTED is there without DONE: a join is refused (see above), unless kubeadm
    stopped in preflight, before it wrote anything, or (`worker`) kubelet has finished its TLS bootstrap since:
    that is the whole of a worker's join. An `init` is run again without preflight (`init`).

    kubeadm's preflight refuses a node it has begun (its manifests, a non-empty /var/lib/etcd), and every later
    phase takes up what it finds (kubeadm v1.37.2: certs and kubeconfig reuse existing files, certs.go and
    kubeconfig.go "Using existing"; bootstrap-token is UpdateOrCreateTokens without failIfExists; the rest
    write files or create-or-update objects). Nothing else depends on a first control plane whose init failed:
    every other node's step runs only after this one succeeded."""
    begun = f"[ -e {ADMIN_KUBECONFIG} ] || [ -e {KUBELET_KUBECONFIG} ] || [ -e /etc/kubernetes/bootstrap-kubelet.conf ]"
    lines = [
        f'kha_unfinished="$(cat {BOOTSTRAP_STARTED} 2>/dev/null || true)"',
        f'if [ -n "$kha_unfinished" ] && ! {{ {begun}; }}; then',
        (
            '  echo "kubeadm-ha: the kubeadm ${kha_unfinished} on ${KUBEADM_HA_HOST} stopped before it changed'
            ' anything; running it again"'
        ),
        "  kha_unfinished=''",
        "fi",
    ]
    if worker:
        lines += [
            f'if [ "$kha_unfinished" = join ] && [ -f {KUBELET_KUBECONFIG} ]; then',
            (
                '  echo "kubeadm-ha: kubelet on ${KUBEADM_HA_HOST} finished its TLS bootstrap after kubeadm join'
                ' gave up; the node has joined"'
            ),
            "  " + shell("mv", "-f", BOOTSTRAP_STARTED, BOOTSTRAP_DONE),
            "  exit 0",
            "fi",
        ]
    lines += [
        'if [ "$kha_unfinished" = join ]; then',
        # kubeadm reset also deletes the shared certificates the place-pki step put there (/etc/kubernetes/pki),
        # and that step, recorded as done, does not run again by itself.
        f"  echo {_UNFINISHED_JOIN}{quote((f' and {pki.replace_hint}' if pki else '') + _OR_REPLACE)} >&2",
        "  exit 1",
        "fi",
    ]
    if pki is not None:
        lines += [
            f"if ! {{ {keys_present(pki.key_paths)}; }}; then",
            '  echo "kubeadm-ha: the shared certificates are missing on ${KUBEADM_HA_HOST}"'
            + quote(
                f", and kubeadm needs them to make this node a control plane of the cluster ({pki.step} placed them"
                f" in /etc/kubernetes/pki; kubeadm reset deletes them). Run {pki.replace_hint}"
            )
            + " >&2",
            "  exit 1",
            "fi",
        ]
    if init is not None:
        lines += [
            'if [ "$kha_unfinished" = init ]; then',
            (
                '  echo "kubeadm-ha: the kubeadm init on ${KUBEADM_HA_HOST} started and did not finish'
                ' (see ${KUBEADM_HA_LOG_DIR}/kubeadm-init.log); running it again past its preflight checks"'
            ),
            *("  " + line for line in init),
            "fi",
        ]
    return lines


def kubeadm_join_script(hostname: str, *, worker: bool, pki: PlacedPki | None = None) -> Script:
    return Script(
        step="kubeadm-join",
        host=hostname,
        done_when=BOOTSTRAP_FINISHED,
        functions=INSTALL_BUNDLE_FUNCTION,
        body=(
            # The document holds the bootstrap token: remove it however the step ends.
            f"trap {quote(shell('rm', '-f', JOIN_CONFIG_PATH))} EXIT",
            *_unfinished(None, worker=worker, pki=pki),
            "install_bundle",
            *_bootstrap("join", "join", "--config", JOIN_CONFIG_PATH),
            # The document holds the bootstrap token; it has done its job.
            shell("rm", "-f", JOIN_CONFIG_PATH),
        ),
    )


def _answers(url: str, ca_file: str) -> str:
    return shell("curl", "--silent", "--fail", "--max-time", "5", "--cacert", ca_file, url) + " >/dev/null 2>&1"


def first_control_plane_script(
    hostname: str, endpoint: str, peers: Sequence[str], *, stacked_etcd: bool, pki: PlacedPki | None = None
) -> Script:
    """`kubeadm init` for a new cluster, `kubeadm join` when this node is rebuilt into a running one. Both need
    the shared keys `pki` placed: without ca.key, kubeadm init would make a CA of its own.

    The first control plane is only special while the cluster does not exist:
    if the API answers (through the endpoint or on any other control plane), this
    node joins it. `kubeadm init` runs only when nothing answers, and never while
    another control plane's etcd port is open (a cluster whose API is down).
    """
    ca_file = "/etc/kubernetes/pki/ca.crt"
    api_urls = [f"https://{endpoint}/readyz", *(f"https://{peer}:6443/readyz" for peer in peers)]
    answers = " || ".join(_answers(url, ca_file) for url in api_urls)
    etcd_open = " || ".join(f"timeout 5 bash -c {shell(f'</dev/tcp/{peer}/2379')} 2>/dev/null" for peer in peers)
    refusal = (
        "kubeadm-ha: the API does not answer but another control plane's etcd does; "
        "refusing to run kubeadm init against a cluster that already exists"
    )
    init = ("init", "--config", INIT_CONFIG_PATH, "--skip-token-print")
    body = [
        # The documents hold the bootstrap token: remove them however the step ends (a refusal, a failed kubeadm).
        f"trap {quote(shell('rm', '-f', INIT_CONFIG_PATH, JOIN_CONFIG_PATH))} EXIT",
        "install_bundle",
        *_unfinished(_bootstrap("init", *init, "--skip-phases=preflight"), pki=pki),
        f"if [ -f {BOOTSTRAP_DONE} ]; then",
        "  :",
        f"elif {answers}; then",
        *("  " + line for line in _bootstrap("join", "join", "--config", JOIN_CONFIG_PATH)),
    ]
    if stacked_etcd and peers:
        body += [f"elif {etcd_open}; then", f"  echo {shell(refusal)} >&2", "  exit 1"]
    body += [
        "else",
        *("  " + line for line in _bootstrap("init", *init)),
        "fi",
        # The documents hold the bootstrap token; they have done their job.
        shell("rm", "-f", INIT_CONFIG_PATH, JOIN_CONFIG_PATH),
    ]
    return Script(
        step="kubeadm-init",
        host=hostname,
        done_when=BOOTSTRAP_FINISHED,
        functions=INSTALL_BUNDLE_FUNCTION,
        body=tuple(body),
    )


def config_bundle(path: str, documents: pulumi.Output[str]) -> pulumi.Output[str]:
    return secret(documents.apply(lambda text: encode_bundle([BundleFile(path, text, 0o600)])))


@dataclass(frozen=True)
class ControlPlaneNodeArgs:
    context: NodeContext
    node: NodePlan
    shape: ClusterShape
    bootstrap: Literal["init", "join"]
    # Everything that must have happened before kubeadm runs on this node.
    after: Sequence[pulumi.Resource]
    # Secret files kubeadm's static pods read, placed with its documents (the EncryptionConfiguration).
    files: pulumi.Input[Sequence[BundleFile]] = ()


class ControlPlaneNode(pulumi.ComponentResource):
    def __init__(self, name: str, args: ControlPlaneNodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:ControlPlaneNode", name, None, opts)
        context, node = args.context, args.node
        config = context.config
        size = VmSize(config.control_plane.cpus, config.control_plane.memory_mib, config.control_plane.disk_gib)
        preparation = kubernetes_node_preparation(
            node.hostname, config.kubernetes, from_bundle=config.artifacts.from_bundle
        )
        self.vm = Vm(node.hostname, context.vm_args(node, size, preparation), pulumi.ResourceOptions(parent=self))
        access = context.access(node)
        self.node, self.access = node, access

        # With external etcd the etcd CA key stays off the control planes (they never sign etcd certificates);
        # the API server reaches etcd with its own client pair instead.
        external = args.shape.external_etcd is not None
        ca_keys = [name for name in context.pki.cas if not external or name != ETCD_CA.name]
        leaves = [context.pki.etcd.apiserver_client] if external and context.pki.etcd is not None else []
        if external and not leaves:
            raise ValueError("external etcd needs the etcd certificates from ClusterPki (ClusterPkiArgs.etcd_members)")
        payload, digests = pki_bundle(context.pki, include_ca_keys=ca_keys, leaves=leaves)
        # What the kubeadm step checks for before kubeadm runs (kubeadm reset deletes it).
        placed = PlacedPki(f"{name}-place-pki", placed_key_paths(context.pki, include_ca_keys=ca_keys, leaves=leaves))
        self.pki_placed = run_step(
            placed.step,
            access,
            digests.apply(lambda found: place_pki_script(node.hostname, found, placed.key_paths)),
            parent=self,
            stdin=payload,
            depends_on=[self.vm.ready],
            replace_with=self.vm.domain.id,
        )

        pki = context.pki
        join_config = pulumi.Output.all(pki.bootstrap_token, pki.ca_cert_hash).apply(
            lambda values: join_documents(
                args.shape,
                hostname=node.hostname,
                address=str(node.address),
                token=values[0],
                ca_cert_hash=values[1],
                control_plane=True,
            )
        )
        self.admin = admin_for(context.plan, node)
        if args.bootstrap == "init":
            init_config = pki.bootstrap_token.apply(
                lambda value: init_documents(args.shape, hostname=node.hostname, address=str(node.address), token=value)
            )
            stdin = secret(
                pulumi.Output.all(init_config, join_config, args.files).apply(
                    lambda docs: encode_bundle(
                        [
                            BundleFile(INIT_CONFIG_PATH, docs[0], 0o600),
                            BundleFile(JOIN_CONFIG_PATH, docs[1], 0o600),
                            *settings_files(args.shape),
                            *docs[2],
                        ]
                    )
                )
            )
            peers = [str(cp.address) for cp in context.plan.control_planes if cp != node]
            script = first_control_plane_script(
                node.hostname,
                args.shape.endpoint,
                peers,
                stacked_etcd=args.shape.external_etcd is None,
                pki=placed,
            )
            # Its token step runs only once another control plane exists; this one removes its Node when it goes.
            removal = node_removal_step(context, node, self.vm, self.admin, parent=self)
        else:
            # Joining nodes refresh the bootstrap token on the first control plane just before they join.
            removal = token_step(context, node, self.vm, self.admin, parent=self, after=args.after, removes_node=True)
            stdin = secret(
                pulumi.Output.all(join_config, args.files).apply(
                    lambda docs: encode_bundle(
                        [BundleFile(JOIN_CONFIG_PATH, docs[0], 0o600), *settings_files(args.shape), *docs[1]]
                    )
                )
            )
            script = kubeadm_join_script(node.hostname, worker=False, pki=placed)
        reset = reset_step(context, node, self.vm, parent=self, after=[removal])
        self.kubeadm: command.remote.Command = run_step(
            f"{name}-kubeadm-{args.bootstrap}",
            access,
            script,
            parent=self,
            stdin=stdin,
            depends_on=[self.pki_placed, reset, *args.after],
            replace_with=self.vm.domain.id,
        )
        # The first control plane's membership runs on the second, which does not exist yet: see `attach_admin`.
        self.membership: command.remote.Command | None = None
        if args.bootstrap == "join":
            self.membership = membership_step(context, node, self.vm, self.admin, self.kubeadm, parent=self)
        elif self.admin == node:
            self.attach_admin(context, self)
        self.register_outputs({"address": str(node.address), "bootstrap": args.bootstrap})

    def attach_admin(self, context: NodeContext, admin: ControlPlaneNode) -> None:
        """For the first control plane: its token and membership steps, on `admin` once that has joined
        (on itself while it is the only control plane, so that scaling down to one keeps them).

        The token step is not a dependency of this node's kubeadm step (that would be a cycle at
        bootstrap); when this VM is rebuilt it is replaced with it and runs while the VM boots, and
        kubeadm's discovery retries until the refreshed token is there.
        """
        token_step(context, self.node, self.vm, admin.node, parent=self, after=[admin.kubeadm], removes_node=False)
        self.membership = membership_step(
            context, self.node, self.vm, admin.node, self.kubeadm, parent=self, after=[admin.kubeadm]
        )

    def apply_cni(self, context: NodeContext) -> command.remote.Command | None:
        """Install the pod network from this (the first) control plane, once `kubeadm init` is done."""
        kubernetes = context.config.kubernetes
        manifest = manifest_for(kubernetes.cni, str(kubernetes.pod_subnet))
        if manifest is None:
            return None
        return run_step(
            f"{self.node.hostname}-cni-{manifest.name}",
            self.access,
            cni_script(
                self.node.hostname,
                manifest,
                str(kubernetes.pod_subnet),
                from_file=bundled_cni_manifest(context.bundle, context.config.artifacts, kubernetes.cni),
            ),
            parent=self,
            depends_on=[self.kubeadm],
            replace_with=self.vm.domain.id,
        )
