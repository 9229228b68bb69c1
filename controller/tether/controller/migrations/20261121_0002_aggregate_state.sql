-- Incremental aggregation (tether.controller.worker, task `tether.aggregate`).
--
-- aggregates.state: the accumulator's running sums plus the fold's watermark, so a
-- round folds only the results that arrived since the previous one. NULL means
-- "no incremental state": the next round rebuilds from every result.
--
-- results.insert_xid: the inserting transaction. `results.id` alone is not a safe
-- watermark: ids are drawn when a row is inserted, but transactions commit in any
-- order, so a result with a lower id can become visible after a higher one has
-- been folded. The worker keeps a horizon instead, "every result whose
-- insert_xid < horizon is folded", taken from pg_snapshot_xmin() (no transaction
-- below it is still running), plus the few ids folded above it. Inserts need not
-- name the column; the default records the inserting transaction.

ALTER TABLE aggregates ADD COLUMN state jsonb;

ALTER TABLE results ADD COLUMN insert_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX results_release_version_xid ON results (release, version, insert_xid);
