"""Permanent against transient install failures (issue 14, class 5): classified once, in one pure function.

A permanent failure (a refused version, a permission problem, a name the
filesystem will not take) is reported once and that version is not tried
again; a transient one (the network, a disk momentarily full) is retried with
backoff. The classification is a table; the daemon tests run real agents
against the scriptable DeviceService on loopback gRPC.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib

import pytest
from agent_fakes import wait_until, write_bundle
from test_agent_daemon import SIMPLE, make_agent, running, stop

from tether.agent import backends, convergence, diskbudget, failures
from tether.agent.failures import Outcome
from tether.common import errors, manifest
from tether.proto.v1 import tether_pb2 as pb

D = "sha256:" + "d" * 64
BUDGET = diskbudget.DiskBudgetExceeded("disk budget exceeded", plan=None)  # type: ignore[arg-type]

TABLE = [
    # (what happened, the error, its outcome)
    ("tampered blob", errors.VerificationFailed("blob digest mismatch"), Outcome.REFUSED),
    ("model that runs nowhere", backends.ModelUnusable("no candidate loads model.mnn"), Outcome.REFUSED),
    ("conflicting manifest", errors.InvalidManifest("files[1].path: 'a' and files[0].path"), Outcome.REFUSED),
    ("policy the agent cannot honour", errors.InvalidSpec("must be an integer", field="resources.x"), Outcome.REFUSED),
    ("corrupt bytes", errors.DigestMismatch("cached blob is corrupt"), Outcome.REFUSED),
    ("over an agent limit", errors.TooLarge("manifest is 5000000 bytes"), Outcome.REFUSED),
    ("disk budget", BUDGET, Outcome.OVER_BUDGET),
    ("permission on the store", PermissionError(errno.EACCES, "Permission denied", "/s/installs"), Outcome.FAILED),
    ("not permitted", PermissionError(errno.EPERM, "Operation not permitted"), Outcome.FAILED),
    ("read-only store", OSError(errno.EROFS, "Read-only file system"), Outcome.FAILED),
    ("unusable file name", OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), Outcome.FAILED),
    ("file where a directory must be", NotADirectoryError(errno.ENOTDIR, "Not a directory"), Outcome.FAILED),
    ("disk momentarily full", OSError(errno.ENOSPC, "No space left on device"), Outcome.RETRY),
    ("quota momentarily full", OSError(errno.EDQUOT, "Disk quota exceeded"), Outcome.RETRY),
    ("too many open files", OSError(errno.EMFILE, "Too many open files"), Outcome.RETRY),
    ("I/O error", OSError(errno.EIO, "Input/output error"), Outcome.RETRY),
    ("connection reset", ConnectionResetError(errno.ECONNRESET, "reset"), Outcome.RETRY),
    ("timeout", TimeoutError(), Outcome.RETRY),
    ("protocol glitch of the server", errors.FailedPrecondition("PullBlobs ended after 1 of 2 blobs"), Outcome.RETRY),
    ("chunk at a wrong offset", errors.InvalidArgument("blob x: chunk at offset 5, expected 0"), Outcome.RETRY),
    ("controller busy", errors.Busy("too many pulls"), Outcome.RETRY),
    ("a bug", KeyError("x"), Outcome.RETRY),
]


@pytest.mark.parametrize(("error", "outcome"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_classify(error: BaseException, outcome: Outcome) -> None:
    verdict = failures.classify(error)
    assert verdict.outcome is outcome
    assert verdict.permanent == (outcome in (Outcome.REFUSED, Outcome.FAILED))
    assert verdict.reason and len(verdict.reason) <= failures.MAX_REASON_CHARS


def test_a_reason_names_the_errno_and_the_path_without_echoing_all_of_it() -> None:
    verdict = failures.classify(OSError(errno.ENAMETOOLONG, "File name too long", "/s/" + "n" * 10_000))
    assert "File name too long (ENAMETOOLONG)" in verdict.reason and "10003 characters" in verdict.reason
    assert len(failures.classify(errors.InvalidManifest("x" * 10_000)).reason) == failures.MAX_REASON_CHARS


def _failed(outcome: Outcome, version: int = 2, digest: str = D) -> convergence.Failed:
    return convergence.Failed(
        version=version, manifest_digest=digest, verdict=failures.Verdict(outcome=outcome, reason="r")
    )


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (_failed(Outcome.FAILED), convergence.Idle()),
        (_failed(Outcome.REFUSED), convergence.Idle()),
        (_failed(Outcome.RETRY), convergence.Install(version=2)),
        (_failed(Outcome.FAILED, version=1), convergence.Install(version=2)),
        (_failed(Outcome.FAILED, digest="sha256:" + "e" * 64), convergence.Install(version=2)),
        (None, convergence.Install(version=2)),
    ],
    ids=["failed for good", "refused", "transient", "an older version failed", "same version, other bundle", "none"],
)
def test_plan_idles_on_a_permanent_failure_of_the_desired_version(failed, expected) -> None:
    desired = convergence.Desired(version=2, manifest_digest=D)
    assert convergence.plan(desired, None, None, None, 0.0, failed=failed) == expected


def test_plan_runs_what_is_installed_even_after_a_failure_of_it() -> None:
    desired = convergence.Desired(version=2, manifest_digest=D)
    installed = convergence.Installed(version=2, manifest_digest=D)
    assert convergence.plan(desired, installed, None, None, 0.0, failed=_failed(Outcome.FAILED)) == convergence.Run(
        version=2
    )


# ---------------------------------------------------------------- the daemon


def _publish_with_long_name(fake, tmp_path, release: str) -> str:
    """A bundle whose file name no filesystem takes (300 bytes): valid in the manifest, unusable on a device."""
    bundle = write_bundle(tmp_path / "long", SIMPLE)
    m = manifest.hash_directory(bundle, name="t", entrypoint="task.py")
    blob = b"weights"
    long = manifest.FileEntry(path="w" * 300 + ".bin", sha256="sha256:" + hashlib.sha256(blob).hexdigest(), size=7)
    m = manifest.Manifest(name=m.name, entrypoint=m.entrypoint, files=(*m.files, long))
    data = m.canonical_bytes()
    fake.manifests[m.digest] = data
    for f in m.files[:-1]:
        fake.blobs[f.sha256] = (bundle / f.path).read_bytes()
    fake.blobs[long.sha256] = blob
    rel = fake.releases.get(release)
    from agent_fakes import Release

    fake.releases[release] = new = Release(release, (rel.version + 1) if rel else 1, m.digest)
    for q in fake.queues.values():
        q.put_nowait(pb.ServerEvent(notify=pb.Notify(task=fake._desired(new))))
    return m.digest


def _count_installs(agent) -> list[int]:
    calls: list[int] = []
    real = agent.store.install

    def counting(release, version, m):
        calls.append(version)
        return real(release, version, m)

    agent.store.install = counting
    return calls


async def test_a_name_the_filesystem_will_not_take_fails_once_and_is_not_retried(fake, tmp_path) -> None:
    _publish_with_long_name(fake, tmp_path, "ns/long")
    agent = make_agent(fake, tmp_path)
    installs = _count_installs(agent)
    task = await running(agent)
    await wait_until(lambda: "FAILED" in fake.states("ns/long"))
    await asyncio.sleep(1.0)  # the FAST backoff would have retried ~10 times by now
    assert fake.states("ns/long", progress=False) == ["FAILED"]
    message = next(m for _, r, _, s, m in fake.statuses if r == "ns/long" and s == "FAILED")
    assert "File name too long (ENAMETOOLONG)" in message
    assert installs == [1]  # tried once

    # A new version is tried (and installs).
    fixed = fake.publish("ns/long", write_bundle(tmp_path / "fixed", SIMPLE))
    await wait_until(lambda: "SUCCEEDED" in fake.states("ns/long"))
    assert installs == [1, fixed.version] and agent.state.installed["ns/long"].version == fixed.version
    await stop(agent, task)


async def test_a_permission_problem_fails_once_and_a_restart_tries_again(fake, tmp_path) -> None:
    rel = fake.publish("ns/perm", write_bundle(tmp_path / "b", SIMPLE))
    agent = make_agent(fake, tmp_path)
    tries: list[int] = []

    def denied(release, version, m):
        tries.append(version)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "installs"))

    agent.store.install = denied
    task = await running(agent)
    await wait_until(lambda: "FAILED" in fake.states(rel.name))
    await asyncio.sleep(0.5)
    await stop(agent, task)
    assert tries == [1] and fake.states(rel.name, progress=False) == ["FAILED"]
    assert "Permission denied (EACCES)" in fake.statuses[-1][4]
    assert rel.name not in agent.state.refused  # FAILED is not a refusal: not kept across restarts

    # The operator fixed the store: a restarted agent installs the same version.
    agent2 = make_agent(fake, tmp_path)
    task2 = await running(agent2)
    await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    await stop(agent2, task2)


async def test_a_transient_failure_is_retried_with_backoff_and_reports_nothing(fake, tmp_path) -> None:
    rel = fake.publish("ns/full", write_bundle(tmp_path / "b", SIMPLE))
    agent = make_agent(fake, tmp_path)
    real = agent.store.install
    tries: list[int] = []

    def momentarily_full(release, version, m):
        tries.append(version)
        if len(tries) <= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(release, version, m)

    agent.store.install = momentarily_full
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    await stop(agent, task)
    assert tries == [1, 1, 1, 1]
    assert "FAILED" not in fake.states(rel.name) and "REFUSED" not in fake.states(rel.name)


async def test_a_failure_after_the_version_went_live_is_not_reported_as_a_failed_install(fake, tmp_path) -> None:
    rel = fake.publish("ns/live", write_bundle(tmp_path / "b", SIMPLE))
    agent = make_agent(fake, tmp_path)

    async def collection_denied() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "blobs/sha256")

    agent.installer.gc = collection_denied  # collecting blobs after the install fails
    task = await running(agent)
    await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    await stop(agent, task)
    assert fake.states(rel.name, progress=False) == ["INSTALLED", "RUNNING", "SUCCEEDED"]
