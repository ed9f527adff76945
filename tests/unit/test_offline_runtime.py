"""Tests for tools/offline/, against a small throwaway program (not the real one)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import ipaddress
import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pulumi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.mocks import MockResourceArgs

from tools.offline import (
    NOT_BEFORE,
    UNKNOWN,
    Evaluation,
    OfflineMocks,
    Registration,
    engine_config,
    evaluate,
)

STACK = "teststack"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"

BUNDLE_PY = '''
import pulumi
import pulumi_tls as tls


class Bundle(pulumi.ComponentResource):
    """A leaf key, its CSR and the certificate the CA signs for it."""

    def __init__(self, name, *, ca_key_pem, ca_cert_pem, dns_names, ip_addresses, opts=None):
        super().__init__("test:index:Bundle", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.key = tls.PrivateKey(f"{name}-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        self.csr = tls.CertRequest(
            f"{name}-csr",
            private_key_pem=self.key.private_key_pem,
            subject={"common_name": name, "organization": "system:masters"},
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            opts=child,
        )
        self.cert = tls.LocallySignedCert(
            f"{name}-cert",
            cert_request_pem=self.csr.cert_request_pem,
            ca_private_key_pem=ca_key_pem,
            ca_cert_pem=ca_cert_pem,
            validity_period_hours=8760,
            allowed_uses=["digital_signature", "key_encipherment", "server_auth", "client_auth"],
            opts=child,
        )
        self.cert_pem = self.cert.cert_pem
        self.register_outputs({"cert_pem": self.cert_pem})
'''

MAIN_PY = """
import pulumi
import pulumi_command as command
import pulumi_tls as tls

from components.bundle import Bundle
from components.errors import SettingsError

settings = pulumi.Config().require_object("settings")
if settings.get("fail"):
    raise SettingsError("boom from the program")

ca_key = tls.PrivateKey("ca-key", algorithm="ECDSA", ecdsa_curve="P256")
ca = tls.SelfSignedCert(
    "ca",
    private_key_pem=ca_key.private_key_pem,
    subject={"common_name": "test-ca", "organization": "offline"},
    is_ca_certificate=True,
    validity_period_hours=87600,
    allowed_uses=["cert_signing", "crl_signing", "digital_signature"],
)
web = Bundle(
    "web",
    ca_key_pem=ca_key.private_key_pem,
    ca_cert_pem=ca.cert_pem,
    dns_names=settings["dns_names"],
    ip_addresses=[settings["ip"]],
)
deploy_key = tls.PrivateKey("deploy-key", algorithm="RSA", rsa_bits=1024)
install = command.remote.Command(
    "install",
    connection=command.remote.ConnectionArgs(
        host=settings["ip"], user="root", private_key=deploy_key.private_key_openssh
    ),
    create="cat > /etc/token",
    stdin=pulumi.Output.secret("s3cret-token"),
    triggers=[web.cert_pem],
    opts=pulumi.ResourceOptions(depends_on=[web]),
)
pulumi.log.warn("hello from the program")
pulumi.export("name", settings["name"])
pulumi.export("token", pulumi.Output.secret("s3cret-token"))
pulumi.export("ca_cert_pem", ca.cert_pem)
pulumi.export("web_cert_pem", web.cert_pem)
pulumi.export("stdout", install.stdout)
"""

ERRORS_PY = """
import pulumi


class SettingsError(pulumi.RunError):
    pass
"""

STACK_YAML = """
config:
  kubeadm-ha:settings:
    name: demo
    ip: 10.0.0.10
    dns_names: [web.example.test, web]
"""


def write_project(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_project(
        tmp_path_factory.mktemp("program"),
        {
            "__main__.py": MAIN_PY,
            "components/__init__.py": "",
            "components/bundle.py": BUNDLE_PY,
            "components/errors.py": ERRORS_PY,
            f"Pulumi.{STACK}.yaml": STACK_YAML,
        },
    )


@pytest.fixture(scope="module")
def applied(project: Path) -> Evaluation:
    return evaluate(STACK, project_dir=project)


@pytest.fixture(scope="module")
def previewed(project: Path) -> Evaluation:
    return evaluate(STACK, project_dir=project, preview=True)


def cert(registration: Registration) -> x509.Certificate:
    return x509.load_pem_x509_certificate(registration.outputs["certPem"].encode())


# --------------------------------------------------------------------------- graph


def test_registrations_in_order_with_parents(applied: Evaluation) -> None:
    names = [r.name for r in applied.resources]
    assert names[0] == f"kubeadm-ha-{STACK}"
    assert applied.resources[0].type == "pulumi:pulumi:Stack"
    assert sorted(names[1:]) == sorted(
        ["ca-key", "ca", "web", "web-key", "web-csr", "web-cert", "deploy-key", "install"]
    )
    # Whatever the interleaving, a resource registers after what it consumes.
    for earlier, later in [("ca-key", "ca"), ("ca", "web-cert"), ("web-key", "web-csr"), ("web", "web-key")]:
        assert names.index(earlier) < names.index(later)
    assert names.index("web-cert") < names.index("install")

    stack_urn = applied.stack_urn
    assert applied.named("ca").parent == stack_urn
    web = applied.named("web")
    assert not web.custom and web.id is None
    assert [r.name for r in applied.children(web)] == ["web-key", "web-csr", "web-cert"]
    assert applied.named("web-cert").urn == (
        f"urn:pulumi:{STACK}::kubeadm-ha::test:index:Bundle$tls:index/locallySignedCert:LocallySignedCert::web-cert"
    )
    assert {r.name for r in applied.by_type(PRIVATE_KEY)} == {"ca-key", "web-key", "deploy-key"}
    assert applied.named("ca-key").id == "ca-key-id"


def test_dependencies_are_recorded_and_transitive(applied: Evaluation) -> None:
    ca, web_cert, install = applied.named("ca"), applied.named("web-cert"), applied.named("install")
    assert set(web_cert.dependencies) == {applied.named(n).urn for n in ("ca-key", "web-csr", "ca")}
    assert web_cert.property_dependencies["caCertPem"] == (ca.urn,)
    # depends_on=[component] reaches the engine as its custom children.
    assert {applied.named(n).urn for n in ("web-key", "web-csr", "web-cert")} <= set(install.dependencies)
    assert applied.depends_on(install, "web")
    assert applied.depends_on("install", "ca-key")  # install -> web-cert -> ca -> ca-key
    assert applied.depends_on(install.urn, applied.named("deploy-key"))
    assert not applied.depends_on("ca-key", "install")
    assert not applied.depends_on("ca", "deploy-key")
    assert not applied.depends_on("deploy-key", "web")
    assert install.replace_on_changes == ("triggers[*]",)
    assert install.provider is None and not install.protect


def test_secret_inputs_are_detected_and_unwrapped(applied: Evaluation) -> None:
    install = applied.named("install")
    assert install.secret_inputs == frozenset({"stdin", "connection"})
    assert install.inputs["stdin"] == "s3cret-token"
    assert install.inputs["connection"]["host"] == "10.0.0.10"
    assert install.inputs["connection"]["privateKey"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert install.outputs["stdout"] == "" and install.outputs["stderr"] == ""
    assert applied.named("ca").secret_inputs == frozenset({"privateKeyPem"})
    assert applied.named("web-cert").secret_inputs == frozenset({"caPrivateKeyPem"})
    assert applied.named("ca-key").secret_inputs == frozenset()
    assert set(applied.named("ca-key").additional_secret_outputs) == {
        "privateKeyOpenssh",
        "privateKeyPem",
        "privateKeyPemPkcs8",
    }
    # Numbers come back as ints, not protobuf doubles.
    assert applied.named("ca").inputs["validityPeriodHours"] == 87600
    assert isinstance(applied.named("ca").inputs["validityPeriodHours"], int)


def test_stack_outputs_and_logs(applied: Evaluation) -> None:
    outputs = applied.outputs
    assert set(outputs) == {"name", "token", "ca_cert_pem", "web_cert_pem", "stdout"}
    assert (outputs["name"].value, outputs["name"].secret, outputs["name"].known) == ("demo", False, True)
    assert (outputs["token"].value, outputs["token"].secret, outputs["token"].known) == ("s3cret-token", True, True)
    assert outputs["web_cert_pem"].value == applied.named("web-cert").outputs["certPem"]
    assert all(o.known for o in outputs.values())
    assert [(m.severity, m.message) for m in applied.logs] == [("warning", "hello from the program")]
    assert applied.config == {
        "kubeadm-ha:settings": '{"name": "demo", "ip": "10.0.0.10", "dns_names": ["web.example.test", "web"]}'
    }


def test_dot_graph(applied: Evaluation) -> None:
    dot = applied.dot()
    assert dot.startswith(f'digraph "{STACK}" {{')
    assert f'"{applied.named("ca-key").urn}" -> "{applied.named("ca").urn}";' in dot
    assert applied.named("web").urn not in dot  # components are not nodes


def test_named_requires_exactly_one(applied: Evaluation) -> None:
    with pytest.raises(LookupError, match="no-such"):
        applied.named("no-such")


# --------------------------------------------------------------------------- TLS material


def test_certificates_verify_against_the_ca(applied: Evaluation) -> None:
    ca_cert, leaf = cert(applied.named("ca")), cert(applied.named("web-cert"))
    ca_key = serialization.load_pem_private_key(applied.named("ca-key").outputs["privateKeyPem"].encode(), None)
    leaf_key = serialization.load_pem_private_key(applied.named("web-key").outputs["privateKeyPem"].encode(), None)

    ca_cert.verify_directly_issued_by(ca_cert)
    leaf.verify_directly_issued_by(ca_cert)
    assert ca_cert.public_key() == ca_key.public_key()
    assert leaf.public_key() == leaf_key.public_key()
    assert leaf.issuer == ca_cert.subject
    assert leaf.subject.rfc4514_string() == "CN=web,O=system:masters"

    ca_constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value.ca
    ca_usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign and ca_usage.digital_signature
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.test", "web"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.10")]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    assert leaf.not_valid_before_utc == NOT_BEFORE
    assert (leaf.not_valid_after_utc - NOT_BEFORE).days == 365
    web_cert = applied.named("web-cert").outputs
    assert web_cert["validityStartTime"] == "2026-01-01T00:00:00Z"
    assert web_cert["validityEndTime"] == "2027-01-01T00:00:00Z"
    assert web_cert["readyForRenewal"] is False
    assert web_cert["caKeyAlgorithm"] == "ECDSA"

    csr = x509.load_pem_x509_csr(applied.named("web-csr").outputs["certRequestPem"].encode())
    assert csr.is_signature_valid and csr.public_key() == leaf_key.public_key()


def test_ecdsa_key_formats(applied: Evaluation) -> None:
    outputs = applied.named("ca-key").outputs
    assert outputs["privateKeyPem"].startswith("-----BEGIN EC PRIVATE KEY-----\n")
    assert outputs["privateKeyPemPkcs8"].startswith("-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(outputs["privateKeyPem"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    openssh = serialization.load_ssh_private_key(outputs["privateKeyOpenssh"].encode(), None)
    assert openssh.public_key() == key.public_key()
    public = serialization.load_pem_public_key(outputs["publicKeyPem"].encode())
    assert public == key.public_key()
    assert outputs["publicKeyOpenssh"].startswith("ecdsa-sha2-nistp256 ") and outputs["publicKeyOpenssh"].endswith("\n")
    wire = base64.b64decode(outputs["publicKeyOpenssh"].split()[1])
    assert outputs["publicKeyFingerprintSha256"] == (
        "SHA256:" + base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")
    )
    assert outputs["publicKeyFingerprintMd5"] == ":".join(f"{b:02x}" for b in hashlib.md5(wire).digest())


def test_rsa_key(applied: Evaluation) -> None:
    outputs = applied.named("deploy-key").outputs
    assert outputs["privateKeyPem"].startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(outputs["privateKeyPem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 1024
    assert key.private_numbers().public_numbers.e == 65537
    openssh = serialization.load_ssh_private_key(outputs["privateKeyOpenssh"].encode(), None)
    assert openssh.public_key() == key.public_key()
    assert outputs["publicKeyOpenssh"].startswith("ssh-rsa ")


@pytest.mark.parametrize(
    ("inputs", "header", "ssh_prefix"),
    [
        ({"algorithm": "ED25519"}, "-----BEGIN PRIVATE KEY-----", "ssh-ed25519 "),
        ({"algorithm": "ECDSA", "ecdsaCurve": "P384"}, "-----BEGIN EC PRIVATE KEY-----", "ecdsa-sha2-nistp384 "),
        ({"algorithm": "ECDSA", "ecdsaCurve": "P521"}, "-----BEGIN EC PRIVATE KEY-----", "ecdsa-sha2-nistp521 "),
        # OpenSSH has no P-224: the provider leaves the SSH fields empty (P224 is its default curve).
        ({"algorithm": "ECDSA"}, "-----BEGIN EC PRIVATE KEY-----", ""),
    ],
)
def test_private_key_mock_variants(inputs: dict[str, str], header: str, ssh_prefix: str) -> None:
    mocks = OfflineMocks()
    args = MockResourceArgs(typ=PRIVATE_KEY, name="k", inputs=inputs, custom=True)
    resource_id, state = mocks.new_resource(args)
    assert resource_id == "k-id"
    assert state["privateKeyPem"].startswith(header)
    assert mocks.new_resource(args)[1] == state  # deterministic
    key = serialization.load_pem_private_key(state["privateKeyPem"].encode(), None)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey))
    if ssh_prefix:
        assert state["publicKeyOpenssh"].startswith(ssh_prefix)
        assert serialization.load_ssh_private_key(state["privateKeyOpenssh"].encode(), None).public_key() == (
            key.public_key()
        )
    else:
        assert state["publicKeyOpenssh"] == state["privateKeyOpenssh"] == state["publicKeyFingerprintMd5"] == ""


def test_other_resources_echo_inputs_with_a_stable_id() -> None:
    mocks = OfflineMocks()
    inputs = {"name": "pool", "path": "/var/lib/libvirt/pool"}
    assert mocks.new_resource(MockResourceArgs("libvirt:index/pool:Pool", "pool", inputs, custom=True)) == (
        "pool-id",
        inputs,
    )
    assert OfflineMocks(preview=True).new_resource(MockResourceArgs(PRIVATE_KEY, "k", {"algorithm": "RSA"})) == (
        None,
        {"algorithm": "RSA"},
    )


# --------------------------------------------------------------------------- runs


def test_evaluations_are_deterministic(project: Path, applied: Evaluation) -> None:
    again = evaluate(STACK, project_dir=project)
    # Resources registered from inside an apply may interleave differently; their content may not.
    assert {r.urn: r for r in again.resources} == {r.urn: r for r in applied.resources}
    assert again.outputs == applied.outputs


def test_preview_leaves_computed_outputs_unknown(previewed: Evaluation, applied: Evaluation) -> None:
    assert [r.urn for r in previewed.resources] == [r.urn for r in applied.resources]
    assert previewed.preview and not applied.preview
    web_cert = previewed.outputs["web_cert_pem"]
    assert (web_cert.value, web_cert.known) == (UNKNOWN, False)
    assert not previewed.outputs["stdout"].known
    assert previewed.outputs["name"].known and previewed.outputs["name"].value == "demo"
    assert previewed.outputs["token"].secret and previewed.outputs["token"].known

    ca_key = previewed.named("ca-key")
    assert ca_key.id is None
    assert ca_key.outputs == {"algorithm": "ECDSA", "ecdsaCurve": "P256"}
    # Inputs built from computed outputs are unknown, and still flagged secret where they were.
    ca = previewed.named("ca")
    assert ca.inputs["privateKeyPem"] is UNKNOWN and "privateKeyPem" in ca.secret_inputs
    install = previewed.named("install")
    assert install.inputs["triggers"] == [UNKNOWN]
    assert install.inputs["stdin"] == "s3cret-token"
    assert "stdout" not in install.outputs


def test_config_mapping_and_several_stacks(project: Path, applied: Evaluation) -> None:
    config = {"settings": {"name": "other", "ip": "192.0.2.7", "dns_names": ["other.test"]}}
    other = evaluate("other", project_dir=project, config=config)
    assert other.outputs["name"].value == "other"
    assert other.stack_urn.startswith("urn:pulumi:other::kubeadm-ha::")
    leaf = cert(other.named("web-cert"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    # Key material is per resource URN, so another stack gets other keys.
    assert other.named("ca-key").outputs["privateKeyPem"] != applied.named("ca-key").outputs["privateKeyPem"]
    assert evaluate(STACK, project_dir=project, preview=True).outputs["name"].value == "demo"


def test_program_exceptions_propagate(project: Path) -> None:
    config = {"kubeadm-ha:settings": {"fail": True}}
    with pytest.raises(pulumi.RunError, match="boom from the program"):
        evaluate(STACK, project_dir=project, config=config)
    with pytest.raises(pulumi.RunError, match="settings"):
        evaluate(STACK, project_dir=project, config={})
    # A failed run leaves nothing behind that breaks the next one.
    assert evaluate(STACK, project_dir=project).outputs["name"].value == "demo"


def test_mock_errors_propagate(tmp_path: Path) -> None:
    program = """
    import pulumi_tls as tls

    key = tls.PrivateKey("key", algorithm="ECDSA", ecdsa_curve="P256")
    tls.SelfSignedCert("cert", private_key_pem=key.private_key_pem, validity_period_hours=1,
                       allowed_uses=["server_auth", "made_up_use"])
    """
    write_project(tmp_path, {"__main__.py": program})
    with pytest.raises(ValueError, match="made_up_use"):
        evaluate(STACK, project_dir=tmp_path, config={})


def test_runs_leave_no_state_behind(project: Path, tmp_path: Path) -> None:
    # A second project whose `components.bundle` differs must not see the first one's module.
    other = write_project(
        tmp_path,
        {
            "__main__.py": "from components.bundle import KIND\nimport pulumi\npulumi.export('kind', KIND)\n",
            "components/__init__.py": "",
            "components/bundle.py": "KIND = 'second'\n",
        },
    )
    cwd, path, components = os.getcwd(), list(sys.path), sys.modules.get("components")
    monitor, root = runtime_settings.SETTINGS.monitor, runtime_settings.get_root_resource()

    assert evaluate(STACK, project_dir=project).named("web").type == "test:index:Bundle"
    assert evaluate(STACK, project_dir=other, config={}).outputs["kind"].value == "second"
    assert evaluate(STACK, project_dir=project).named("web").type == "test:index:Bundle"

    assert os.getcwd() == cwd
    assert sys.path == path
    assert sys.modules.get("components") is components
    assert runtime_settings.SETTINGS.monitor is monitor
    assert runtime_settings.get_root_resource() is root
    # The SDK's settings fall back to class-wide defaults in a fresh thread; runs must not rewrite them.
    assert settings_seen_by_a_new_thread() == (None, "stack", None)


def settings_seen_by_a_new_thread() -> tuple[object, object, object]:
    seen: list[tuple[object, object, object]] = []

    def read() -> None:
        settings = runtime_settings.SETTINGS
        seen.append((settings.monitor, settings.stack, settings.dry_run))

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    return seen[0]


def test_engine_config_encoding() -> None:
    values, secret_keys = engine_config(
        {"kubeadm-ha:name": "plain", "count": 3, "flag": True, "net": {"cidr": "10.0.0.0/24"}, "pw": {"secure": "x"}},
        "kubeadm-ha",
    )
    assert values == {
        "kubeadm-ha:name": "plain",
        "kubeadm-ha:count": "3",
        "kubeadm-ha:flag": "true",
        "kubeadm-ha:net": '{"cidr": "10.0.0.0/24"}',
        "kubeadm-ha:pw": "offline-secret:kubeadm-ha:pw",
    }
    assert secret_keys == ["kubeadm-ha:pw"]


@pytest.fixture
def restore_imports() -> Iterator[None]:
    saved_path, saved_modules = list(sys.path), dict(sys.modules)
    yield
    sys.path[:] = saved_path
    for name in set(sys.modules) - set(saved_modules):
        del sys.modules[name]
    sys.modules.update(saved_modules)


def test_program_uses_the_callers_modules(project: Path, restore_imports: None) -> None:
    # As a test of the real program would: import the program's own error class, then expect it.
    for name in [name for name in sys.modules if name.partition(".")[0] == "components"]:
        del sys.modules[name]
    sys.path.insert(0, str(project))
    errors = importlib.import_module("components.errors")
    with pytest.raises(errors.SettingsError):
        evaluate(STACK, project_dir=project, config={"settings": {"fail": True}})
    assert sys.modules["components.errors"] is errors
    assert "components.bundle" not in sys.modules  # imported by the run only, so dropped again
