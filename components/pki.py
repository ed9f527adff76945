"""ClusterPki: every key and certificate the cluster shares, generated once by pulumi-tls.

Material is modelled by purpose, and each purpose knows its kubeadm path, so
the placement step and the tests read from one table. The bootstrap token and
the discovery hash are computed here, up front, so nothing is ever scraped from
`kubeadm init` output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components.remote import secret
from model.addressing import NodePlan
from render.etcd import ETCD_PKI_DIR, EtcdPaths
from render.kubeadm import PKI_DIR

CA_VALIDITY_HOURS = 10 * 365 * 24  # kubeadm's CA lifetime
CLIENT_VALIDITY_HOURS = 365 * 24  # kubeadm's client-certificate lifetime
# Renew the admin certificate on the first `pulumi up` within 30 days of expiry.
CLIENT_EARLY_RENEWAL_HOURS = 30 * 24
ADMIN_GROUP = "kubeadm:cluster-admins"  # bound to cluster-admin by kubeadm >= 1.29
ADMIN_USER = "kubeadm-ha-admin"
_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_CA_USES = ["cert_signing", "crl_signing", "digital_signature", "key_encipherment"]
# Leaf certificates live as long as kubeadm's and are re-issued by the first `pulumi up` within 30 days of
# expiry; etcd and its clients read certificate files at every TLS handshake, so new files need no restart.
LEAF_VALIDITY_HOURS = CLIENT_VALIDITY_HOURS
LEAF_EARLY_RENEWAL_HOURS = CLIENT_EARLY_RENEWAL_HOURS
# etcd's certificates are issued where its members read them (kubeadm's layout, render/etcd.py).
_ETCD_PATHS = EtcdPaths()
ETCD_SERVER_CERT_PATH, ETCD_SERVER_KEY_PATH = _ETCD_PATHS.server_cert, _ETCD_PATHS.server_key
ETCD_PEER_CERT_PATH, ETCD_PEER_KEY_PATH = _ETCD_PATHS.peer_cert, _ETCD_PATHS.peer_key


@dataclass(frozen=True)
class CaPurpose:
    """One shared CA: its kubeadm file names under /etc/kubernetes/pki and its subject CN."""

    name: str
    common_name: str
    cert_path: str
    key_path: str


CLUSTER_CA = CaPurpose("cluster-ca", "kubernetes", f"{PKI_DIR}/ca.crt", f"{PKI_DIR}/ca.key")
FRONT_PROXY_CA = CaPurpose(
    "front-proxy-ca", "front-proxy-ca", f"{PKI_DIR}/front-proxy-ca.crt", f"{PKI_DIR}/front-proxy-ca.key"
)
ETCD_CA = CaPurpose("etcd-ca", "etcd-ca", _ETCD_PATHS.trusted_ca, f"{ETCD_PKI_DIR}/ca.key")
SHARED_CAS = (CLUSTER_CA, FRONT_PROXY_CA, ETCD_CA)
SA_KEY_PATH = f"{PKI_DIR}/sa.key"
SA_PUB_PATH = f"{PKI_DIR}/sa.pub"


@dataclass(frozen=True)
class LeafPurpose:
    """One certificate signed by a shared CA: what it is for, its subject, SANs and kubeadm file names."""

    name: str  # prefix of its resources' names
    ca: CaPurpose
    common_name: str
    cert_path: str
    key_path: str
    server_auth: bool
    client_auth: bool
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @property
    def allowed_uses(self) -> list[str]:
        uses = ["digital_signature", "key_encipherment"]
        return uses + ["server_auth"] * self.server_auth + ["client_auth"] * self.client_auth


def _etcd_member_sans(node: NodePlan) -> dict[str, tuple[str, ...]]:
    # What kubeadm puts on etcd's server and peer certificates: peers and clients dial the address,
    # local tools dial loopback (v4 and v6).
    return {"dns_names": (node.hostname, "localhost"), "ip_addresses": (str(node.address), "127.0.0.1", "::1")}


def etcd_server_purpose(node: NodePlan) -> LeafPurpose:
    """An etcd member's client-facing certificate (also a client: members dial each other's gRPC gateway)."""
    return LeafPurpose(
        name=f"{node.hostname}-etcd-server",
        ca=ETCD_CA,
        common_name=node.hostname,
        cert_path=ETCD_SERVER_CERT_PATH,
        key_path=ETCD_SERVER_KEY_PATH,
        server_auth=True,
        client_auth=True,
        **_etcd_member_sans(node),
    )


def etcd_peer_purpose(node: NodePlan) -> LeafPurpose:
    """An etcd member's peer certificate: server and client, because each peer link is dialled by both ends."""
    return LeafPurpose(
        name=f"{node.hostname}-etcd-peer",
        ca=ETCD_CA,
        common_name=node.hostname,
        cert_path=ETCD_PEER_CERT_PATH,
        key_path=ETCD_PEER_KEY_PATH,
        server_auth=True,
        client_auth=True,
        **_etcd_member_sans(node),
    )


ETCD_HEALTHCHECK_CLIENT = LeafPurpose(
    name="etcd-healthcheck-client",
    ca=ETCD_CA,
    common_name="kube-etcd-healthcheck-client",
    cert_path=_ETCD_PATHS.healthcheck_cert,
    key_path=_ETCD_PATHS.healthcheck_key,
    server_auth=False,
    client_auth=True,
)
APISERVER_ETCD_CLIENT = LeafPurpose(
    name="apiserver-etcd-client",
    ca=ETCD_CA,
    common_name="kube-apiserver-etcd-client",
    cert_path=f"{PKI_DIR}/apiserver-etcd-client.crt",
    key_path=f"{PKI_DIR}/apiserver-etcd-client.key",
    server_auth=False,
    client_auth=True,
)


def bootstrap_token(secret_material: str) -> str:
    """A kubeadm bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`) derived from key material.

    Deterministic, so re-evaluating the program yields the same token, yet
    unguessable without the cluster CA key it is derived from.
    """
    digest = hmac.new(secret_material.encode(), b"kubeadm-ha bootstrap token v1", hashlib.sha512).digest()
    # 256 is not a multiple of 36; rejection sampling keeps every character uniform.
    chars = [_TOKEN_ALPHABET[byte % 36] for byte in digest if byte < 252]
    if len(chars) < 22:  # pragma: no cover - 64 bytes essentially never lose 43 to rejection
        raise ValueError("not enough key material for a bootstrap token")
    return "".join(chars[:6]) + "." + "".join(chars[6:22])


def ca_cert_hash(public_key_pem: str) -> str:
    """kubeadm's discovery hash: `sha256:` + hex SHA-256 of the CA's DER SubjectPublicKeyInfo."""
    lines = [line.strip() for line in public_key_pem.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise ValueError("expected a PEM SubjectPublicKeyInfo ('PUBLIC KEY') block")
    der = base64.b64decode("".join(lines[1:-1]))
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class _Issued:
    key: tls.PrivateKey
    cert: tls.SelfSignedCert | tls.LocallySignedCert

    @property
    def cert_pem(self) -> pulumi.Output[str]:
        return self.cert.cert_pem

    @property
    def key_pem(self) -> pulumi.Output[str]:
        return secret(self.key.private_key_pem)


@dataclass(frozen=True)
class IssuedCa(_Issued):
    purpose: CaPurpose


@dataclass(frozen=True)
class IssuedLeaf(_Issued):
    purpose: LeafPurpose


@dataclass(frozen=True)
class EtcdMemberPki:
    server: IssuedLeaf
    peer: IssuedLeaf


@dataclass(frozen=True)
class EtcdPki:
    """The external etcd cluster's certificates, all signed by the etcd CA."""

    members: Mapping[str, EtcdMemberPki]  # by hostname
    healthcheck_client: IssuedLeaf
    apiserver_client: IssuedLeaf


@dataclass(frozen=True)
class ClusterPkiArgs:
    cluster_name: str
    hostnames: Sequence[str]
    # External etcd members; empty with stacked etcd, where kubeadm makes the etcd certificates on each node.
    etcd_members: Sequence[NodePlan] = ()
    # `certificates.renewBeforeDays`: pulumi-tls re-issues a leaf certificate on the first `pulumi up` this close
    # to its expiry (components/certificates.py).
    early_renewal_hours: int = LEAF_EARLY_RENEWAL_HOURS


class ClusterPki(pulumi.ComponentResource):
    """The shared CAs, the service-account key, the admin client certificate and all SSH keys."""

    def __init__(self, name: str, args: ClusterPkiArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:ClusterPki", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.early_renewal_hours = args.early_renewal_hours
        self.cas = {purpose.name: self._ca(purpose, args.cluster_name, child) for purpose in SHARED_CAS}
        self.cluster_ca = self.cas[CLUSTER_CA.name]

        self.service_account_key = _ecdsa_key("service-account-key", child)
        self.admin_key = _ecdsa_key("admin-client-key", child)
        admin_csr = tls.CertRequest(
            "admin-client-csr",
            private_key_pem=self.admin_key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=ADMIN_USER, organization=ADMIN_GROUP),
            opts=child,
        )
        self.admin_cert = tls.LocallySignedCert(
            "admin-client-cert",
            cert_request_pem=admin_csr.cert_request_pem,
            ca_private_key_pem=self.cluster_ca.key.private_key_pem,
            ca_cert_pem=self.cluster_ca.cert.cert_pem,
            validity_period_hours=CLIENT_VALIDITY_HOURS,
            early_renewal_hours=args.early_renewal_hours,
            allowed_uses=["digital_signature", "key_encipherment", "client_auth"],
            opts=child,
        )
        self.operator_ssh_key = tls.PrivateKey(
            "operator-ssh-key",
            algorithm="ED25519",
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=_SECRET_KEY_OUTPUTS),
        )
        self.host_keys = {
            hostname: tls.PrivateKey(
                f"{hostname}-ssh-host-key",
                algorithm="ED25519",
                opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=_SECRET_KEY_OUTPUTS),
            )
            for hostname in args.hostnames
        }

        self.etcd: EtcdPki | None = None
        if args.etcd_members:
            self.etcd = EtcdPki(
                members={
                    node.hostname: EtcdMemberPki(
                        server=self._leaf(etcd_server_purpose(node), child),
                        peer=self._leaf(etcd_peer_purpose(node), child),
                    )
                    for node in args.etcd_members
                },
                healthcheck_client=self._leaf(ETCD_HEALTHCHECK_CLIENT, child),
                apiserver_client=self._leaf(APISERVER_ETCD_CLIENT, child),
            )

        self.bootstrap_token: pulumi.Output[str] = secret(self.cluster_ca.key.private_key_pem.apply(bootstrap_token))
        self.ca_cert_hash: pulumi.Output[str] = self.cluster_ca.key.public_key_pem.apply(ca_cert_hash)
        self.operator_private_key: pulumi.Output[str] = secret(self.operator_ssh_key.private_key_openssh)

        self.register_outputs(
            {
                "caCertPem": self.cluster_ca.cert_pem,
                "caCertHash": self.ca_cert_hash,
                "operatorPublicKey": self.operator_ssh_key.public_key_openssh,
            }
        )

    def _ca(self, purpose: CaPurpose, cluster_name: str, child: pulumi.ResourceOptions) -> IssuedCa:
        key = _ecdsa_key(f"{purpose.name}-key", child)
        cert = tls.SelfSignedCert(
            purpose.name,
            private_key_pem=key.private_key_pem,
            subject=tls.SelfSignedCertSubjectArgs(common_name=purpose.common_name, organizational_unit=cluster_name),
            is_ca_certificate=True,
            set_subject_key_id=True,
            validity_period_hours=CA_VALIDITY_HOURS,
            allowed_uses=_CA_USES,
            opts=child,
        )
        return IssuedCa(key=key, cert=cert, purpose=purpose)

    def _leaf(self, purpose: LeafPurpose, child: pulumi.ResourceOptions) -> IssuedLeaf:
        ca = self.cas[purpose.ca.name]
        key = _ecdsa_key(f"{purpose.name}-key", child)
        csr = tls.CertRequest(
            f"{purpose.name}-csr",
            private_key_pem=key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=purpose.common_name),
            dns_names=list(purpose.dns_names) or None,
            ip_addresses=list(purpose.ip_addresses) or None,
            opts=child,
        )
        cert = tls.LocallySignedCert(
            f"{purpose.name}-cert",
            cert_request_pem=csr.cert_request_pem,
            ca_private_key_pem=ca.key.private_key_pem,
            ca_cert_pem=ca.cert.cert_pem,
            validity_period_hours=LEAF_VALIDITY_HOURS,
            early_renewal_hours=self.early_renewal_hours,
            allowed_uses=purpose.allowed_uses,
            opts=child,
        )
        return IssuedLeaf(key=key, cert=cert, purpose=purpose)

    def host_public_key(self, hostname: str) -> pulumi.Output[str]:
        return self.host_keys[hostname].public_key_openssh.apply(lambda text: text.strip())

    def host_private_key(self, hostname: str) -> pulumi.Output[str]:
        return secret(self.host_keys[hostname].private_key_openssh)


# pulumi-tls marks these secret itself; saying so again keeps them secret even if a provider version does not.
_SECRET_KEY_OUTPUTS = ["privateKeyPem", "privateKeyOpenssh", "privateKeyPemPkcs8"]


def _ecdsa_key(name: str, child: pulumi.ResourceOptions) -> tls.PrivateKey:
    return tls.PrivateKey(
        name,
        algorithm="ECDSA",
        ecdsa_curve="P256",
        opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(additional_secret_outputs=_SECRET_KEY_OUTPUTS)),
    )
