"""Issue 18, defect 4: whenever a hypervisor's base image volume is created, its image was just fetched here.

The libvirt provider reads a volume's `source` file on the machine running Pulumi, and only when it creates
the volume; pulumi-command runs a local command's `create` only when the command is created or replaced (or
its inputs change). So what matters is which commands a run creates: a URN absent from the last run's state
is created (its script runs on this machine), a command whose `triggers` changed is replaced (runs again),
one whose inputs are unchanged does nothing. These tests judge that from the URNs and inputs the program
registers under mocks, two runs apart (the engine's own diff is not run here: that rule is the stand-in,
taken from pulumi-command 1.2.1 common/inputs.go `triggers` replaceOnChanges and local/commandController.go).
"""

from __future__ import annotations

from model.config import ImageConfig
from render.image import cached_image_path
from tests.program.test_multihost import HV_D_KEY, hypervisors, multihost, run
from tools.offline import Evaluation, Registration

COMMAND = "command:local:Command"
VOLUME = "libvirt:index/volume:Volume"
FOURTH = {"name": "hv-d", "uri": "qemu+ssh://kubeadm@hv-d.lan.example/system", "hostKey": HV_D_KEY}


def base_volume(ev: Evaluation, host: str) -> Registration:
    return ev.named(f"{host}-base-image")


def fetches_before(ev: Evaluation, volume: Registration) -> list[Registration]:
    """The local commands the volume waits for."""
    return [r for r in ev.by_type(COMMAND) if ev.depends_on(volume, r)]


def engine_action(previous: Evaluation, current: Registration) -> str:
    """What the engine does with a local command: create, replace, update (runs `create`) or nothing."""
    old = next((r for r in previous.resources if r.urn == current.urn), None)
    if old is None:
        return "create"
    if old.inputs.get("triggers") != current.inputs.get("triggers"):
        return "replace"
    keys = ("create", "update", "interpreter", "environment", "dir")
    return "update" if any(old.inputs.get(k) != current.inputs.get(k) for k in keys) else "same"


def image_path(ev: Evaluation) -> str:
    volume = ev.by_type(VOLUME)[0]
    return str(volume.inputs["source"])


def test_a_hypervisor_added_later_fetches_the_image_before_its_base_volume() -> None:
    first = multihost()
    grown = run(first, hypervisors=[*hypervisors(), FOURTH])
    volume = base_volume(grown, "hv-d")
    fetches = fetches_before(grown, volume)
    # The new host's volume waits for a fetch that this run creates, so it runs here, on this machine.
    assert [engine_action(first, fetch) for fetch in fetches] == ["create"], [f.name for f in fetches]
    (fetch,) = fetches
    script = fetch.inputs["create"]
    assert volume.inputs["source"] in script and "sha256sum" in script
    assert fetch.inputs["interpreter"] == ["/bin/bash", "-c"]


def test_a_second_run_fetches_nothing_and_each_host_has_its_own_fetch() -> None:
    first = multihost()
    again = run(first)
    for host in ("hv-a", "hv-b", "hv-c"):
        (fetch,) = fetches_before(again, base_volume(again, host))
        assert engine_action(first, fetch) == "same", host
    # One fetch per host: no host's volume relies on another host's fetch having run.
    owners = {
        fetch.urn for host in ("hv-a", "hv-b", "hv-c") for fetch in fetches_before(again, base_volume(again, host))
    }
    assert len(owners) == 3


def test_a_new_image_replaces_every_fetch_with_the_volume_that_reads_it() -> None:
    first = multihost()
    url = "https://images.example/lab-2.qcow2"
    digest = "ab" * 32
    # The gate would (rightly) want staging to run the new image first; this test is about the fetch only.
    gate_off = {"gate": "off", "reason": "a test of the base image fetch"}
    changed = run(first, image={"url": url, "sha256": digest}, promotion=gate_off)
    for host in ("hv-a", "hv-b", "hv-c"):
        volume = base_volume(changed, host)
        # The volume's source changes (the provider replaces it: every argument is ForceNew) ...
        assert volume.inputs["source"] == cached_image_path(ImageConfig(url=url, sha256=digest))
        assert volume.inputs["source"] != base_volume(first, host).inputs["source"]
        # ... and the fetch it waits for is replaced too, so it runs before the new volume reads the file.
        (fetch,) = fetches_before(changed, volume)
        assert engine_action(first, fetch) == "replace", host
