"""Delivery reports, group-committed: every ReportStatus of a burst goes into one storage batch.

When a push reaches a whole fleet, every device reports within the same
second; `groupcommit.GroupCommit` turns those calls into batches, and the
storage writes a batch at once (`ReleaseLedger.write_reports`), each report
still checked and refused on its own. This returns once the report's batch
committed. Nothing here knows SQL: the batching policy runs over any storage.
"""

from __future__ import annotations

from collections.abc import Mapping

from tether.controller import deliveries, devices, groupcommit, stage_health
from tether.controller.storage import contracts


class DeliveryReporter:
    def __init__(self, ledger: contracts.ReleaseLedger, *, max_batch: int = 512) -> None:
        self._ledger = ledger
        self.batches: groupcommit.GroupCommit[deliveries.DeliveryReport] = groupcommit.GroupCommit(
            ledger.write_reports, max_batch=max_batch
        )

    async def report_delivery(
        self,
        *,
        device: devices.Device,
        release: str,
        version: int,
        state: str,
        message: str = "",
        device_state: Mapping[str, str] | None = None,
    ) -> None:
        """Keep the latest state a device reports; a stale report (older version) changes nothing.

        A report on the version a staged rollout serves this device (its stable
        version, older than the current one) is not stale: it moves the delivery
        back. `device_state`: the device's participation state, kept on the device.
        """
        deliveries.check_report(release=release, state=state)
        report = deliveries.DeliveryReport(
            device=device,
            release=release,
            version=version,
            state=state,
            message=message,
            device_state=stage_health.check_device_state(device_state or {}),
        )
        await self.batches.submit(report)
