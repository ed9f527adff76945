"""issue 18, defect 6: `tools.promote` removes a release key the source does not run.

prod (here: staging) pins `image.sha256`; the source runs a signed Ubuntu image (or a local file) without one.
The promotion must take the key out of the target's stack file, leave every other byte as it was, show the
removal in its diff, and leave a file the real config model (model/stack.py) accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import DEFAULT_IMAGE
from model.release import release_of
from model.stack import config_from_stack_file

# The copy of the program and its stack files (fixtures), and how a stack's outputs and a run are made.
from tests.unit.test_promote_command import DEV, IMAGE, NEW, deployed, program, project, run  # noqa: F401

PIN = "ab" * 32

# One stack file per way an operator writes the pinned image: a block mapping with comments, a flow mapping.
HEAD = "# staging: mirrors prod at smaller sizes.\nconfig:\n  kubeadm-ha:clusterName: staging   # the prefix\n"
TAIL = f"""  kubeadm-ha:network:
    cidr: 10.17.4.0/24
  kubeadm-ha:kubernetes:
    version: "{NEW}"
    cni: calico
  kubeadm-ha:loadBalancer: {{replicas: 1, vip: 10.17.4.10}}
  kubeadm-ha:controlPlane: {{replicas: 1}}
  kubeadm-ha:workers: {{replicas: 0}}
  kubeadm-ha:promotion: {{from: dev}}
"""
IMAGE_BLOCK = (
    "  kubeadm-ha:image:\n"
    "    # The image the cluster was built from.\n"
    "    url: @URL@   # the mirror\n"
    f"    sha256: {PIN}   # pinned by hand when the image was unsigned\n"
    "    # (end of the image settings)\n"
)
IMAGE_FLOW = f"  kubeadm-ha:image: {{url: @URL@, sha256: {PIN}}}  # pinned\n"
STYLES = {
    # style: (the target's image entry, the same entry without the pin)
    "block": (
        IMAGE_BLOCK,
        IMAGE_BLOCK.replace(f"    sha256: {PIN}   # pinned by hand when the image was unsigned\n", ""),
    ),
    "flow": (IMAGE_FLOW, IMAGE_FLOW.replace(f", sha256: {PIN}", "")),
    # The pin first: what follows it moves up, nothing else changes.
    "flow-first": (
        f"  kubeadm-ha:image: {{sha256: '{PIN}', url: @URL@}}\n",
        "  kubeadm-ha:image: {url: @URL@}\n",
    ),
}


@pytest.mark.parametrize("image", [IMAGE, DEFAULT_IMAGE], ids=["local-file", "signed-ubuntu"])
@pytest.mark.parametrize("style", list(STYLES))
def test_promote_removes_a_release_key_the_source_does_not_run(
    project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    style: str,
    image: str,
) -> None:
    pinned, unpinned = (entry.replace("@URL@", image) for entry in STYLES[style])
    before, expected = HEAD + pinned + TAIL, HEAD + unpinned + TAIL
    dev = DEV.replace(f"kubeadm-ha:image: {IMAGE}", f"kubeadm-ha:image: {image}")
    (project / "Pulumi.staging.yaml").write_text(before)
    (project / "Pulumi.dev.yaml").write_text(dev)
    source = deployed(project, dev, "dev")
    assert "imageSha256" not in source["release"]

    status = run(project, "staging", source=source, target=deployed(project, before, "staging"))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    # Exactly the pin went; every other byte (comments, order, flow and block layout) is as it was.
    assert (project / "Pulumi.staging.yaml").read_bytes() == expected.encode()
    # The diff shows the removal, and the summary names the key.
    removed = [line for line in captured.out.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed and all(PIN in line for line in removed)
    assert "removes image.sha256" in captured.out
    # The real config model accepts the result, and it declares exactly what dev runs.
    promoted = config_from_stack_file(str(project / "Pulumi.staging.yaml"), "staging")
    assert promoted.image.sha256 is None and promoted.image.url == image
    assert release_of(promoted) == source["release"]
    # A second promotion has nothing left to do.
    assert run(project, "staging", source=source, target=deployed(project, expected, "staging")) == 0
    assert "nothing to promote" in capsys.readouterr().out
    assert (project / "Pulumi.staging.yaml").read_bytes() == expected.encode()


# --------------------------------------------------------------------------- the removal itself (tools/stack_yaml.py)


def test_remove_takes_out_one_entry_in_its_own_style_and_nothing_else() -> None:
    from tools.stack_yaml import Refused, remove_settings, rewrite_settings

    sha = ("kubeadm-ha:image", "sha256")
    # The last entry of a block mapping, before another top-level key; CRLF line ends kept.
    text = "config:\r\n  kubeadm-ha:image:\r\n    url: /a.img\r\n    sha256: 'x'  # pin\r\n  # next\r\n  a:b: 1\r\n"
    assert (
        remove_settings(text, [sha]) == "config:\r\n  kubeadm-ha:image:\r\n    url: /a.img\r\n  # next\r\n  a:b: 1\r\n"
    )
    # At the end of the file without a final newline.
    assert remove_settings("config:\n  kubeadm-ha:image:\n    url: /a\n    sha256: x", [sha]) == (
        "config:\n  kubeadm-ha:image:\n    url: /a\n"
    )
    # In a flow mapping between two others.
    assert remove_settings("config:\n  kubeadm-ha:image: {a: 1, sha256: x, url: /a}\n", [sha]) == (
        "config:\n  kubeadm-ha:image: {a: 1, url: /a}\n"
    )
    # Changed and removed in one promotion: the URL rewritten in place, the pin gone.
    changed = rewrite_settings(text, {("kubeadm-ha:image", "url"): "/b.img"})
    assert (
        remove_settings(changed, [sha])
        == "config:\r\n  kubeadm-ha:image:\r\n    url: /b.img\r\n  # next\r\n  a:b: 1\r\n"
    )
    # Nothing to remove: the file is returned as it was.
    assert remove_settings("config:\n  kubeadm-ha:image: /a.img\n", [sha]) == "config:\n  kubeadm-ha:image: /a.img\n"
    # A mapping that would be left empty (its meaning would change to null) is refused, not guessed.
    with pytest.raises(Refused, match="empty mapping"):
        remove_settings("config:\n  kubeadm-ha:image: {sha256: x}\n", [sha])
