"""Five-field cron schedules: re-exported from `tether.common.cron`, where the pure parser lives.

The operator and the controller validate cron triggers with the same parser
the agent schedules with; see `tether.common.cron` for the syntax.
"""

from __future__ import annotations

from tether.common.cron import MAX_EXPRESSION_LEN, CronSchedule, InvalidCron

__all__ = ["MAX_EXPRESSION_LEN", "CronSchedule", "InvalidCron"]
