"""SecretsEncryption: the keys that encrypt Secrets at rest, and the phases that enable and rotate them.

Each key generation's key is derived from a pulumi-tls private key made for it (HMAC-SHA256, as the bootstrap
token is derived from the CA key): random once, then the same on every run, and held only in the state, as a
secret. Every generation's key stays in the state after it is retired: an etcd snapshot taken before a rotation
holds Secrets written with an older key, and only the state can still decrypt them (README: etcd backups).

The phases (render/encryption.py) run as three chains of steps, one control plane at a time, around the
control-plane settings chain, which gives API servers that never had it the `--encryption-provider-config`
flag: `add` (before it), then `promote`, one `rewrite`, and `drop`. In a run that changes nothing each step's
guard finds its phase done, and the steps' inputs are the same, so a second `pulumi up` is a no-op.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command
import pulumi_tls as tls

from components.remote import run_step, secret
from render.encryption import (
    CONFIG_PATH,
    IDENTITY,
    PROVIDER,
    Key,
    Phase,
    configuration,
    entries,
    key_name,
    phase_script,
    rewrite_script,
)
from render.scripts import BundleFile, encode_bundle

if TYPE_CHECKING:
    from components.control_plane_config import SettingsTarget
    from components.nodes import NodeContext

_KEY_CONTEXT = b"kubeadm-ha secrets encryption key v1"


def derive_key(private_key_pem: str) -> bytes:
    """A 32-byte secretbox key from a generation's private key: deterministic, unguessable without it."""
    return hmac.new(private_key_pem.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


@dataclass(frozen=True)
class SecretsEncryptionArgs:
    # The generation to run (`encryption.rotation`), and the one the running cluster uses (None: none yet).
    generation: int
    running_generation: int | None
    # What the move to `running_generation` started from (the last `secretsEncryption` output).
    running_from: str | None
    # True when the cluster exists already: its control planes move in phases; a new one starts on the key.
    cluster_exists: bool


class SecretsEncryption(pulumi.ComponentResource):
    def __init__(self, name: str, args: SecretsEncryptionArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:SecretsEncryption", name, None, opts)
        self.generation = args.generation
        self.new = key_name(args.generation)
        self.moving = args.cluster_exists and args.running_generation != args.generation
        if self.moving:
            self.old = key_name(args.running_generation) if args.running_generation is not None else IDENTITY
        else:
            # The move that brought the cluster here, or none (a new cluster starts on the key): the phases'
            # files stay what they were, so the run after a rotation changes nothing.
            self.old = args.running_from if args.running_generation is not None and args.running_from else self.new
        child = pulumi.ResourceOptions(parent=self)
        self._keys = {
            generation: tls.PrivateKey(f"secrets-encryption-key-{generation}", algorithm="ED25519", opts=child)
            for generation in range(args.generation + 1)
        }
        self._secrets = {
            key_name(generation): secret(private.private_key_pem.apply(lambda pem: pem))
            for generation, private in self._keys.items()
        }
        self.register_outputs({"generation": args.generation})

    def file(self, phase: Phase) -> pulumi.Output[str]:
        """The EncryptionConfiguration of `phase` of this run's move (a secret)."""
        order = entries(phase, self.old, self.new)
        needed = [name for name in order if name != IDENTITY]
        return secret(
            pulumi.Output.all(*(self._secrets[name] for name in needed)).apply(
                lambda pems: configuration(
                    order, [Key(name, derive_key(pem)) for name, pem in zip(needed, pems, strict=True)]
                )
            )
        )

    def bootstrap_file(self) -> pulumi.Output[str]:
        """What a control plane kubeadm sets up gets: the final file (model/running.py refuses to add control
        planes in a run that moves the others, which still write with the old key)."""
        return self.file("drop")

    def bootstrap_files(self) -> pulumi.Output[list[BundleFile]]:
        return self.bootstrap_file().apply(lambda text: [BundleFile(CONFIG_PATH, text, 0o600)])

    def phase(
        self, context: NodeContext, targets: Sequence[SettingsTarget], phase: Phase, after: Sequence[pulumi.Resource]
    ) -> list[command.remote.Command]:
        """`phase` on every control plane, one after another, after `after`."""
        payload = secret(self.file(phase).apply(lambda text: encode_bundle([BundleFile(CONFIG_PATH, text, 0o600)])))
        steps: list[command.remote.Command] = []
        previous = list(after)
        for target in targets:
            host = target.node.hostname
            step = run_step(
                f"{host}-encryption-{phase}",
                context.access(target.node),
                phase_script(host, phase, self.old, self.new),
                parent=self,
                stdin=payload,
                depends_on=[target.after, *previous],
                replace_with=target.vm.domain.id,
            )
            steps.append(step)
            previous = [step]
        return steps

    def rewrite(
        self, context: NodeContext, target: SettingsTarget, after: Sequence[pulumi.Resource]
    ) -> command.remote.Command:
        host = target.node.hostname
        return run_step(
            f"{host}-encryption-rewrite",
            context.access(target.node),
            rewrite_script(host, self.new),
            parent=self,
            depends_on=[target.after, *after],
            replace_with=target.vm.domain.id,
        )

    def keys_output(self) -> pulumi.Output[dict[str, str]]:
        """`secretsEncryptionKeys` (a secret): every generation's key, base64, for tools/etcd_restore.py, which
        must read Secrets in snapshots taken before a rotation."""
        names = list(self._secrets)
        keys = pulumi.Output.all(*(self._secrets[name] for name in names)).apply(
            lambda pems: {
                name: base64.b64encode(derive_key(pem)).decode() for name, pem in zip(names, pems, strict=True)
            }
        )
        return pulumi.Output.secret(keys)

    def record(self, finished: Sequence[pulumi.Resource]) -> pulumi.Output[dict[str, object]]:
        """The `secretsEncryption` output, published once every phase of this run is done."""
        ids = [step.id for step in finished if isinstance(step, pulumi.CustomResource)]
        return pulumi.Output.all(*ids).apply(
            lambda _: {"provider": PROVIDER, "generation": self.generation, "key": self.new, "from": self.old}
        )
