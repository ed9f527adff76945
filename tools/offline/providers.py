"""Provider stand-ins: the outputs each mocked resource type computes from its inputs.

pulumi-tls resources get real keys and certificates (:mod:`tools.offline.keys`,
:mod:`tools.offline.certificates`); pulumi-command commands get empty output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from tools.offline.certificates import cert_request_outputs, locally_signed_cert_outputs, self_signed_cert_outputs
from tools.offline.keys import private_key_outputs


def _command_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"stdout": "", "stderr": ""}


COMPUTED_OUTPUTS: Final[dict[str, Callable[[str, Mapping[str, Any]], dict[str, Any]]]] = {
    "tls:index/privateKey:PrivateKey": private_key_outputs,
    "tls:index/selfSignedCert:SelfSignedCert": self_signed_cert_outputs,
    "tls:index/certRequest:CertRequest": cert_request_outputs,
    "tls:index/locallySignedCert:LocallySignedCert": locally_signed_cert_outputs,
    "command:remote:Command": _command_outputs,
    "command:local:Command": _command_outputs,
}
