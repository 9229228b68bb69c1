"""The agent's durable state: `state.json` (credential, installed versions, refusals, run records).

One small JSON document, read once at start and rewritten atomically on
every change, so a crash leaves the old or the new state. Run records are
written before a run starts, so a restarted agent re-runs or re-uploads under
the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any

from tether.agent.files import atomic_write_json
from tether.common import errors

STATE_VERSION = 1
MAX_STATE_BYTES = 1024 * 1024


@dataclasses.dataclass
class RunRecord:
    """One run of a task. Written before the task runs, so a restart reuses `key` for the upload."""

    key: str
    release: str
    version: int
    trigger: str
    status: str  # "running" | "uploading" | "uploaded" | "failed"
    started_at: float
    finished_at: float = 0.0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


@dataclasses.dataclass
class InstalledTask:
    release: str
    version: int
    manifest_digest: str
    # The version's policy as announced (DesiredTask), so a restarted agent runs it the same way
    # before the stream's Sync arrives.
    trigger_json: str = ""
    resources_json: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InstalledTask:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


@dataclasses.dataclass
class AgentState:
    device_id: str = ""
    credential: str = ""
    installed: dict[str, InstalledTask] = dataclasses.field(default_factory=dict)
    # release -> {"version": int, "digest": str, "reason": str}: versions refused; not retried.
    refused: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    runs: dict[str, RunRecord] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_VERSION,
            "device_id": self.device_id,
            "credential": self.credential,
            "installed": {k: dataclasses.asdict(v) for k, v in sorted(self.installed.items())},
            "refused": dict(sorted(self.refused.items())),
            "runs": {k: v.to_json() for k, v in self.runs.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AgentState:
        return cls(
            device_id=str(doc.get("device_id", "")),
            credential=str(doc.get("credential", "")),
            installed={k: InstalledTask.from_json(v) for k, v in (doc.get("installed") or {}).items()},
            refused=dict(doc.get("refused") or {}),
            runs={k: RunRecord.from_json(v) for k, v in (doc.get("runs") or {}).items()},
        )

    def runs_of(self, release: str, version: int | None = None) -> list[RunRecord]:
        return [r for r in self.runs.values() if r.release == release and (version is None or r.version == version)]

    def prune_runs(self, *, keep_per_release: int = 20) -> list[str]:
        """Forget old finished runs; never a run whose upload is still pending. Returns removed keys."""
        removed = []
        by_release: dict[str, list[RunRecord]] = {}
        for r in self.runs.values():
            by_release.setdefault(r.release, []).append(r)
        for runs in by_release.values():
            done = sorted((r for r in runs if r.status in {"uploaded", "failed"}), key=lambda r: r.started_at)
            for r in done[: max(0, len(done) - keep_per_release)]:
                del self.runs[r.key]
                removed.append(r.key)
        return removed

    def abandon_runs(self, release: str) -> list[str]:
        """The release is gone: its unfinished runs fail. Returns their keys (their stored results go too)."""
        abandoned = []
        for record in self.runs_of(release):
            if record.status in {"running", "uploading"}:
                record.status, record.message = "failed", "revoked before upload"
                abandoned.append(record.key)
        return abandoned


class StateFile:
    """`state.json`, read once and rewritten atomically on every change."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        raw = self.path.read_bytes()
        if len(raw) > MAX_STATE_BYTES * 16:
            raise errors.FailedPrecondition(f"{self.path}: unreasonably large ({len(raw)} bytes)")
        doc = json.loads(raw)
        if doc.get("schema") != STATE_VERSION:
            raise errors.FailedPrecondition(f"{self.path}: unknown schema {doc.get('schema')!r}")
        return AgentState.from_json(doc)

    def save(self, state: AgentState) -> None:
        atomic_write_json(self.path, state.to_json())
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)  # holds the device credential


class Ledger:
    """The agent's state and its file: the rooms change `state`, then `save()` (one writer, no other copy)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._file = StateFile(path)
        self.state = self._file.load()

    def save_now(self) -> None:
        """Write it (blocking); old finished run records are pruned first."""
        self.state.prune_runs()
        self._file.save(self.state)

    async def save(self) -> None:
        await asyncio.to_thread(self.save_now)
