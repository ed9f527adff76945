"""The two programs the performance test previews side by side (issue 19, part 7).

- the product, with a stack file derived from Pulumi.dev.yaml: 3 control planes and 100 workers (everything
  else as dev has it);
- a trivial Python program that registers the same resources as the product's offline evaluation of that stack
  (tools.offline, the evaluation behind tools.plan): the same type tokens, names and parent tree, the same
  providers (one explicit libvirt provider with the product's `uri`, the default command and tls providers, the
  engine's builtin Stash), through the same SDK classes, but with trivial constant inputs and no dependencies
  beyond what its tls resources need (a key's PEM). It reads the list from `resources.json` beside it.

The difference between their previews is what the product's own Python costs over the engine's floor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.real.engine.toolchain import ROOT
from tools.offline import evaluate

CONTROL_PLANES, WORKERS = 3, 100
STACK = "perf"


def perf_stack_config() -> dict[str, Any]:
    """Pulumi.dev.yaml's `config:` with 3 control planes and 100 workers."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    config["kubeadm-ha:controlPlane"] = {**config["kubeadm-ha:controlPlane"], "replicas": CONTROL_PLANES}
    config["kubeadm-ha:workers"] = {**config["kubeadm-ha:workers"], "replicas": WORKERS}
    return config


def write_perf_stack(project: Path) -> None:
    (project / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump({"config": perf_stack_config()}, sort_keys=True))


def manifest() -> list[dict[str, Any]]:
    """The product's registrations for the perf stack, in order: type, name, parent's index, provider's inputs."""
    evaluation = evaluate(STACK, project_dir=ROOT, config=perf_stack_config(), preview=True)
    # The engine's own root is made by every program; parents and providers are indices into the list.
    resources = [resource for resource in evaluation.resources if resource.type != "pulumi:pulumi:Stack"]
    index = {resource.urn: i for i, resource in enumerate(resources)}
    entries = []
    for resource in resources:
        entry: dict[str, Any] = {"type": resource.type, "name": resource.name, "custom": resource.custom}
        if resource.parent in index:
            entry["parent"] = index[resource.parent]
        if resource.provider:
            entry["provider"] = index[resource.provider.rsplit("::", 1)[0]]
        if resource.type.startswith("pulumi:providers:"):
            entry["inputs"] = {"uri": resource.inputs["uri"]}
        entries.append(entry)
    return entries


def write_trivial_program(project: Path) -> None:
    (project / "resources.json").write_text(json.dumps(manifest()))
    (project / "__main__.py").write_text(TRIVIAL_PROGRAM)


TRIVIAL_PROGRAM = '''\
"""Registers resources.json: the product's types, names, parents and providers, with trivial inputs."""

import json
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_libvirt as libvirt
import pulumi_tls as tls

entries = json.loads((Path(__file__).parent / "resources.json").read_text())
made: dict[int, pulumi.Resource] = {}
pem: dict[str, pulumi.Output[str]] = {}


def key(name, opts):
    made_key = tls.PrivateKey(name, algorithm="ED25519", opts=opts)
    pem.setdefault("key", made_key.private_key_pem)
    return made_key


def self_signed(name, opts):
    cert = tls.SelfSignedCert(
        name,
        private_key_pem=pem["key"],
        subject=tls.SelfSignedCertSubjectArgs(common_name=name),
        validity_period_hours=1,
        allowed_uses=["cert_signing"],
        is_ca_certificate=True,
        opts=opts,
    )
    pem.setdefault("ca", cert.cert_pem)
    return cert


def request(name, opts):
    csr = tls.CertRequest(name, private_key_pem=pem["key"], opts=opts)
    pem.setdefault("csr", csr.cert_request_pem)
    return csr


MAKE = {
    "tls:index/privateKey:PrivateKey": key,
    "tls:index/selfSignedCert:SelfSignedCert": self_signed,
    "tls:index/certRequest:CertRequest": request,
    "tls:index/locallySignedCert:LocallySignedCert": lambda name, opts: tls.LocallySignedCert(
        name,
        cert_request_pem=pem["csr"],
        ca_private_key_pem=pem["key"],
        ca_cert_pem=pem["ca"],
        validity_period_hours=1,
        allowed_uses=["client_auth"],
        opts=opts,
    ),
    "command:local:Command": lambda name, opts: command.local.Command(name, create="true", opts=opts),
    "command:remote:Command": lambda name, opts: command.remote.Command(
        name, connection=command.remote.ConnectionArgs(host="192.0.2.1"), create="true", opts=opts
    ),
    "libvirt:index/network:Network": lambda name, opts: libvirt.Network(name, name=name, mode="none", opts=opts),
    "libvirt:index/volume:Volume": lambda name, opts: libvirt.Volume(name, name=name, size=1 << 20, opts=opts),
    "libvirt:index/cloudInitDisk:CloudInitDisk": lambda name, opts: libvirt.CloudInitDisk(
        name, name=name, user_data="#cloud-config\\n", opts=opts
    ),
    "libvirt:index/domain:Domain": lambda name, opts: libvirt.Domain(name, name=name, memory=512, vcpu=1, opts=opts),
    "pulumi:index:Stash": lambda name, opts: pulumi.Stash(name, input=name, opts=opts),
}

for i, entry in enumerate(entries):
    opts = pulumi.ResourceOptions(
        parent=made.get(entry.get("parent", -1)),
        provider=made.get(entry.get("provider", -1)),
    )
    if entry["type"] == "pulumi:providers:libvirt":
        made[i] = libvirt.Provider(entry["name"], uri=entry["inputs"]["uri"], opts=opts)
    elif entry["custom"]:
        made[i] = MAKE[entry["type"]](entry["name"], opts)
    else:
        component = pulumi.ComponentResource(entry["type"], entry["name"], None, opts)
        component.register_outputs({})
        made[i] = component
'''
