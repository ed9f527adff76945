"""Pull one image (linux/amd64) from its registry into an OCI archive that `ctr images import` names as pulled.

The OCI distribution API (distribution-spec: GET /v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest>),
anonymous bearer tokens where the registry asks for one (the `WWW-Authenticate: Bearer realm=...` challenge of
the Docker token spec), HTTPS only. The tag is resolved once; from then on everything is fetched by digest and
checked against it. The archive is an OCI image layout (image-spec image-layout.md): oci-layout, index.json
naming the image in `io.containerd.image.name` and `org.opencontainers.image.ref.name`, blobs/sha256/*.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from model.bundle import BundleError

_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
_TIMEOUT_SECONDS = 300
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def split_reference(reference: str) -> tuple[str, str, str]:
    """(registry host, repository, tag) of `registry.k8s.io/pause:3.10.2`; docker.io as its API host."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        raise BundleError(f"{reference}: an image reference needs a tag")
    registry, _, repository = name.partition("/")
    if registry == "docker.io":
        registry = "registry-1.docker.io"
        repository = repository if "/" in repository else f"library/{repository}"
    return registry, repository, tag


class Registry:
    def __init__(self, host: str, repository: str) -> None:
        self.base = f"https://{host}/v2/{repository}"
        self.repository = repository
        self.token: str | None = None

    def get(self, path: str, accept: tuple[str, ...] = ()) -> tuple[bytes, str]:
        for _ in range(2):
            request = urllib.request.Request(self.base + path, headers={"Accept": ", ".join(accept)} if accept else {})
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:
                    return bytes(response.read()), str(response.headers.get("Content-Type", ""))
            except urllib.error.HTTPError as error:
                challenge = error.headers.get("WWW-Authenticate", "")
                if error.code != 401 or self.token is not None or not challenge.startswith("Bearer "):
                    raise BundleError(f"{self.base}{path}: HTTP {error.code}") from None
                self.token = self._token(dict(_CHALLENGE.findall(challenge)))
            except OSError as error:
                raise BundleError(f"{self.base}{path}: {error}") from None
        raise BundleError(f"{self.base}{path}: refused after authenticating")

    def _token(self, challenge: dict[str, str]) -> str:
        realm = challenge.get("realm", "")
        if not realm.startswith("https://"):
            raise BundleError(f"{self.base}: token realm {realm!r} is not https")
        query = urllib.parse.urlencode(
            {"service": challenge.get("service", ""), "scope": f"repository:{self.repository}:pull"}
        )
        with urllib.request.urlopen(f"{realm}?{query}", timeout=_TIMEOUT_SECONDS) as response:
            document = json.load(response)
        return str(document.get("token") or document.get("access_token"))

    def blob(self, digest: str, accept: tuple[str, ...] = ()) -> bytes:
        data, _ = self.get(f"/blobs/{digest}" if not accept else f"/manifests/{digest}", accept)
        found = "sha256:" + hashlib.sha256(data).hexdigest()
        if found != digest:
            raise BundleError(f"{self.base}: {digest} served as {found}: not taken")
        return data


def pull_image(reference: str, out: Path) -> Path:
    host, repository, tag = split_reference(reference)
    registry = Registry(host, repository)
    data, media_type = registry.get(f"/manifests/{tag}", (*_INDEX_TYPES, *_MANIFEST_TYPES))
    document: dict[str, Any] = json.loads(data)
    media_type = document.get("mediaType") or media_type.split(";")[0]
    if media_type in _INDEX_TYPES:
        chosen = next(
            (
                entry
                for entry in document.get("manifests", ())
                if (entry.get("platform") or {}).get("os") == "linux"
                and (entry.get("platform") or {}).get("architecture") == "amd64"
            ),
            None,
        )
        if chosen is None:
            raise BundleError(f"{reference}: no linux/amd64 image in its index")
        digest = str(chosen["digest"])
        data = registry.blob(digest, _MANIFEST_TYPES)
        document = json.loads(data)
        media_type = document.get("mediaType") or str(chosen.get("mediaType"))
    else:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs = {digest: data}
    for descriptor in (document["config"], *document["layers"]):
        blobs[str(descriptor["digest"])] = registry.blob(str(descriptor["digest"]))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": media_type,
                "digest": digest,
                "size": len(data),
                "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag},
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index).encode()}
    members |= {f"blobs/sha256/{name.removeprefix('sha256:')}": blob for name, blob in blobs.items()}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, 0
            archive.addfile(info, io.BytesIO(members[name]))
    return out
