"""The admin kubeconfig exported by the stack (built from pulumi-tls material, never copied off a node)."""

from __future__ import annotations

import base64

from render import yamldoc


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def render_kubeconfig(*, cluster_name: str, server: str, ca_pem: str, cert_pem: str, key_pem: str, user: str) -> str:
    context = f"{user}@{cluster_name}"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [
            {"name": user, "user": {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)}}
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return yamldoc.dump(document)
