"""Helpers for the operator tests: a fake controller, Kopf in-process on the emulator, polling."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tether.common import errors
from tether.devtools.emulator import EmulatedCluster
from tether.operator import handlers, reconcile

T = TypeVar("T")
POLL = 0.2  # the operator's status poll in these tests, seconds
DIGEST = "sha256:" + "0" * 64


class Unavailable(errors.TetherError):
    code = "UNAVAILABLE"


class FakeAdmin:
    """A `handlers.ReleaseAdmin` that records calls; `unavailable` makes every call fail like a dead controller."""

    def __init__(self) -> None:
        self.calls: list[reconcile.Action] = []
        self.versions: dict[str, int] = {}
        self.specs: dict[str, reconcile.ApplyRelease] = {}
        self.unavailable = False
        self.counts: dict[str, int] = {}

    def _check(self) -> None:
        if self.unavailable:
            raise Unavailable("connection refused (test)")

    async def apply(self, action: reconcile.ApplyRelease) -> reconcile.Applied:
        self._check()
        self.calls.append(action)
        old = self.specs.get(action.release)
        content = ("manifest_digest", "target_json", "trigger_json", "aggregation_json", "resources_json")
        changed = old is None or any(getattr(old, f) != getattr(action, f) for f in content)
        if changed:
            self.versions[action.release] = self.versions.get(action.release, 0) + 1
        self.specs[action.release] = action
        return reconcile.Applied(version=self.versions[action.release], changed=changed)

    async def delete(self, action: reconcile.DeleteRelease) -> reconcile.Deleted:
        self._check()
        self.calls.append(action)
        return reconcile.Deleted(existed=self.specs.pop(action.release, None) is not None)

    async def observe(self, release: str, *, report_deadline_s: int | None = None) -> reconcile.ObservedRelease | None:
        self._check()
        if release not in self.specs:
            return None
        return reconcile.Observation(release=release, version=self.versions[release], **self.counts)


async def wait_for(probe: Callable[[], Awaitable[T]], *, timeout: float = 15.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


@contextlib.asynccontextmanager
async def running_operator(
    cluster: EmulatedCluster,
    admin: handlers.ReleaseAdmin | Callable[[], contextlib.AbstractAsyncContextManager[handlers.ReleaseAdmin]],
    *,
    poll_interval: float = POLL,
    metrics: Any = None,
    kubeconfig: Any = None,
) -> AsyncIterator[None]:
    """Kopf namespaced to the cluster's namespace, in a thread with its own event loop, until the block ends.

    Its own loop, because Kopf cancels every task created after it started when it stops: in the
    test's loop, that would include the emulator's and an in-process controller's tasks. `admin` is a
    `ReleaseAdmin`, or a factory of an async context manager of one (a gRPC channel must be created
    in the loop that uses it).
    """
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        async with admin() if callable(admin) else _just(admin) as release_admin:
            await handlers.run(
                admin=release_admin,
                namespaces=[cluster.namespace],
                poll_interval=poll_interval,
                kubeconfig=kubeconfig or cluster.kubeconfig_path,
                stop_flag=stop,
                ready_flag=ready,
                metrics=metrics,
            )

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:
            failure.append(e)
            ready.set()

    thread = threading.Thread(target=thread_main, name="kopf", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 30), "the operator did not get ready"
        if failure:
            raise failure[0]
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the operator did not stop"
    if failure:
        raise failure[0]


@contextlib.asynccontextmanager
async def _just(admin: handlers.ReleaseAdmin) -> AsyncIterator[handlers.ReleaseAdmin]:
    yield admin


def mltask(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "MLTask",
        "metadata": {"name": name},
        "spec": {"bundle": {"digest": DIGEST}, **spec},
    }
