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

-- What a round trains from (the global model's blob and the release version carrying it) and
-- what it published: the new model's blob, the derived manifest and version, the server
-- state (FedAvgM / FedOpt moments, a blob), samples, device metrics and the privacy spent.
ALTER TABLE fl_rounds
    ADD COLUMN model text NOT NULL DEFAULT '',
    ADD COLUMN version bigint NOT NULL DEFAULT 0,
    ADD COLUMN eligible integer NOT NULL DEFAULT 0,
    ADD COLUMN result_model text,
    ADD COLUMN result_manifest text,
    ADD COLUMN result_version bigint,
    ADD COLUMN state_digest text,
    ADD COLUMN samples bigint,
    ADD COLUMN metrics jsonb,
    ADD COLUMN epsilon double precision;

-- A federated release's bundle as the operator sent it; releases.manifest_digest is then the
-- latest round's (the base with its global model file replaced). '' when not federated.
ALTER TABLE releases ADD COLUMN base_manifest text NOT NULL DEFAULT '';
