"""Offline runtime for the kubeadm-ha Pulumi program.

Evaluates ``__main__.py`` for a stack under Pulumi's mock runtime (no CLI, no
provider plugins) and returns everything the program registered, so tests and
the offline ``plan`` command can assert on resources, their inputs, their
dependency graph and the stack outputs.

Typical use::

    from tools.offline import evaluate

    ev = evaluate("dev")
    ca = ev.named("cluster-ca")
    assert ev.depends_on("kubeadm-init", ca)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import os
import runpy
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from pulumi._utils import ContextProperty
from pulumi.runtime import config as runtime_config
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.mocks import MockEngine
from pulumi.runtime.stack import run_in_stack

from tools.offline.monitor import OfflineMocks, RecordingEngine, RecordingMonitor
from tools.offline.results import Evaluation, StackOutputs
from tools.offline.stack_config import engine_config, load_stack_config, project_name

_LOG = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent.parent


# --------------------------------------------------------------------------- running

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Runs are serialised: they share process-wide state (cwd, sys.path, sys.modules).
_EVALUATE_LOCK = threading.Lock()


class _SerialExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each monitor RPC to completion before the event loop continues.

    The SDK issues RPCs on a thread pool, so with several workers the order in
    which the monitor sees registrations would vary from run to run. One worker
    and a blocking ``submit`` make that order a pure function of the program.
    The RPCs still run off the loop thread, because the mock monitor drives its
    own event loop there.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="pulumi-offline-rpc")

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> concurrent.futures.Future[_T]:
        future = super().submit(fn, *args, **kwargs)
        concurrent.futures.wait([future])
        return future


def _close_thread_event_loop() -> None:
    # The mock monitor creates an event loop in the worker thread; close it with the run.
    try:
        loop = asyncio.get_event_loop()
    except RuntimeError:
        return
    asyncio.set_event_loop(None)
    loop.close()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Program errors are re-raised by run_in_stack; the leftovers asyncio reports
    # about abandoned tasks would only duplicate them (the language host hides them too).
    _LOG.debug("asyncio: %s", context.get("message"), exc_info=context.get("exception"))


_CONTEXT_PROPERTY_DEFAULT: Final = "_ContextProperty__default"


def _settings_defaults() -> dict[str, Any]:
    # pulumi's ContextProperty rewrites its class-wide default the first time a
    # context sets it; remember the defaults so a run leaves no trace behind.
    return {
        name: getattr(prop, _CONTEXT_PROPERTY_DEFAULT, None)
        for name, prop in vars(runtime_settings.Settings).items()
        if isinstance(prop, ContextProperty)
    }


def _restore_settings_defaults(defaults: Mapping[str, Any]) -> None:
    for name, value in defaults.items():
        setattr(vars(runtime_settings.Settings)[name], _CONTEXT_PROPERTY_DEFAULT, value)


def _local_module_names(project_dir: Path) -> set[str]:
    names = {path.stem for path in project_dir.glob("*.py")}
    names |= {path.parent.name for path in project_dir.glob("*/__init__.py")}
    names.discard("__main__")
    return names


def _comes_from(module: Any, directory: Path) -> bool:
    locations = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or [])]
    return any(location and Path(location).resolve().is_relative_to(directory) for location in locations)


@contextlib.contextmanager
def _program_environment(project_dir: Path) -> Iterator[None]:
    """Make ``project_dir`` importable and current while the program runs.

    Modules the caller already imported from ``project_dir`` are reused, so the
    program raises and returns the very classes the caller holds (``pytest.raises``
    works). Modules first imported by the program are dropped after the run, so
    every run imports them afresh; same-named modules from elsewhere (another
    project) are set aside for the run and put back afterwards.
    """
    local = _local_module_names(project_dir)

    def is_local(name: str) -> bool:
        return name.partition(".")[0] in local

    shadowing = {
        name: module for name, module in sys.modules.items() if is_local(name) and not _comes_from(module, project_dir)
    }
    for name in shadowing:
        del sys.modules[name]
    kept = {name for name in sys.modules if is_local(name)}
    saved_cwd = os.getcwd()
    saved_defaults = _settings_defaults()
    path_entry = str(project_dir)
    sys.path.insert(0, path_entry)
    importlib.invalidate_caches()
    try:
        os.chdir(project_dir)
        yield
    finally:
        os.chdir(saved_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(path_entry)
        for name in [name for name in sys.modules if is_local(name) and name not in kept]:
            del sys.modules[name]
        sys.modules.update(shadowing)
        _restore_settings_defaults(saved_defaults)


def _run_program(
    program: Path,
    *,
    project: str,
    stack: str,
    project_dir: Path,
    preview: bool,
    config: dict[str, str],
    secret_keys: list[str],
    monitor: RecordingMonitor,
    engine: MockEngine,
) -> None:
    """Run the program like the Python language host does, on a private event loop.

    Called on a dedicated thread: it starts with an empty contextvars context and
    no event loop, so nothing the SDK keeps in either can reach the caller.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_quiet_exception_handler)
    executor = _SerialExecutor()
    loop.set_default_executor(executor)
    try:
        # Equivalent to set_mocks(), minus the root stack it would create: run_in_stack
        # creates that itself, as for a real program run.
        runtime_settings.configure(
            runtime_settings.Settings(
                project=project,
                stack=stack,
                monitor=monitor,
                engine=engine,
                dry_run=preview,
                organization="organization",
                root_directory=str(project_dir),
            )
        )
        runtime_settings.ROOT.set(None)
        runtime_config.set_all_config(config, secret_keys)

        def main() -> None:
            runpy.run_path(str(program), run_name="__main__")

        loop.run_until_complete(run_in_stack(main))
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            executor.submit(_close_thread_event_loop).result()
        finally:
            executor.shutdown(wait=True)
            asyncio.set_event_loop(None)
            loop.close()


def evaluate(
    stack: str,
    *,
    project_dir: Path | None = None,
    config: Mapping[str, Any] | None = None,
    preview: bool = False,
    previous_outputs: Mapping[str, Any] | None = None,
    stack_outputs: Mapping[str, StackOutputs] | None = None,
    previous_resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> Evaluation:
    """Evaluate the program for ``stack`` offline and return what it registered.

    :param stack: stack name; selects ``Pulumi.<stack>.yaml`` and appears in URNs.
    :param project_dir: directory holding ``__main__.py`` (default: the repository root).
    :param config: the complete ``config:`` mapping to use instead of the stack file,
        e.g. ``{"kubeadm-ha:network": {...}}``.
    :param preview: evaluate like ``pulumi preview`` of a new stack: computed
        outputs (keys, certificates, ids, command output) are unknown.
    :param previous_outputs: the stack outputs of the "last deployment", as the
        engine's ``pulumi:pulumi:readStackOutputs`` would return them (default: none,
        a new stack).
    :param stack_outputs: other stacks' outputs, as a ``pulumi.StackReference`` (or
        ``readStackOutputs``) reads them, by stack name: a mapping, ``None`` for a stack
        that does not exist, :data:`UNKNOWN` for outputs that are not known. A stack not
        named here is modelled as deployed exactly as its ``Pulumi.<stack>.yaml`` in
        ``project_dir`` says, by this checkout of the program (see
        :func:`stacks_as_their_files_say`); without a stack file it does not exist.
    :param previous_resources: the stack's state, as the engine's ``pulumi:pulumi:readStackResourceOutputs``
        would return it (``{urn: {"type": ..., "outputs": ...}}``, see :meth:`Evaluation.state`); it also
        decides what an existing ``pulumi.Stash`` keeps. Default: no resources. The real engine persists
        this resource by resource, so after a failed run it holds what that run created while the outputs
        (``previous_outputs``) are still those of the last successful run.
    :raises: whatever the program raises (e.g. a ``pulumi.RunError`` from config
        validation), re-raised unchanged. What was registered and read up to the failure
        is attached: :func:`evaluation_of_failure` returns it.
    """
    directory = (project_dir or REPO_ROOT).resolve()
    program = directory / "__main__.py"
    if not program.is_file():
        raise FileNotFoundError(f"no Pulumi program at {program}")
    project = project_name(directory)
    raw_config = dict(config) if config is not None else load_stack_config(directory, stack)
    values, secret_keys = engine_config(raw_config, project)

    from_files = stacks_as_their_files_say(directory)
    given = dict(stack_outputs or {})

    def other_stacks(name: str) -> StackOutputs:
        return given[name] if name in given else from_files(name)

    monitor = RecordingMonitor(
        OfflineMocks(
            preview=preview,
            previous_outputs=previous_outputs,
            stack=stack,
            other_stacks=other_stacks,
            previous_resources=previous_resources,
        )
    )
    engine = RecordingEngine()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _run_program(
                program,
                project=project,
                stack=stack,
                project_dir=directory,
                preview=preview,
                config=values,
                secret_keys=secret_keys,
                monitor=monitor,
                engine=engine,
            )
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    with _EVALUATE_LOCK, _program_environment(directory):
        thread = threading.Thread(target=target, name=f"pulumi-offline-{stack}")
        thread.start()
        thread.join()
    evaluation = Evaluation(
        stack=stack,
        preview=preview,
        resources=list(monitor.registrations),
        outputs=dict(monitor.stack_outputs),
        config=values,
        logs=list(engine.messages),
        reads=list(monitor.reads),
    )
    if failure:
        failure[0].__dict__[_PARTIAL_EVALUATION] = evaluation
        raise failure[0]
    return evaluation


_PARTIAL_EVALUATION: Final = "offline_evaluation"


def evaluation_of_failure(error: BaseException) -> Evaluation | None:
    """What a failed :func:`evaluate` had registered, read and logged before the program raised ``error``."""
    found = getattr(error, _PARTIAL_EVALUATION, None)
    return found if isinstance(found, Evaluation) else None


def stacks_as_their_files_say(project_dir: Path) -> Callable[[str], StackOutputs]:
    """Model other stacks offline: each deployed exactly as its stack file says, by this program revision.

    The outputs are the release outputs the program's own ``model.release`` computes, so a stack that
    promotes from another sees it run the release its file declares. Called while the program runs (its
    modules are importable then); a stack without a stack file does not exist.
    """

    def outputs(stack: str) -> StackOutputs:
        path = project_dir / f"Pulumi.{stack}.yaml"
        if not path.is_file():
            return None
        release = importlib.import_module("model.release")
        config = importlib.import_module("model.stack")
        parsed = config.config_from_stack_file(str(path), stack)
        result: Mapping[str, Any] = release.deployment_outputs(parsed, release.program_digest(project_dir))
        return result

    return outputs
