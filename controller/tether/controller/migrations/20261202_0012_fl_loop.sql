-- The federated loop (docs/internals.md "Federated rounds").
--
-- releases.federated: the MLTask's spec.federated document ({} = not federated).
-- fl_participants gains what an accepted update is: its blob, weight, metrics and
-- encoding, written in the admitting transaction (an accepted update is never lost).
-- fl_rounds.refusals: refusals per reason ({"NotSelected": 2, "InvalidUpdate": 1}),
-- content refusals (bad digest, shape, NaN, size) included.

ALTER TABLE releases ADD COLUMN federated jsonb NOT NULL DEFAULT '{}';

ALTER TABLE fl_participants
    ADD COLUMN update_digest text,
    ADD COLUMN update_samples bigint,
    ADD COLUMN update_metrics jsonb,
    ADD COLUMN update_encoding text;

ALTER TABLE fl_rounds ADD COLUMN refusals jsonb NOT NULL DEFAULT '{}';
