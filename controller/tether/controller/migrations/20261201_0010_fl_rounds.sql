-- Federated rounds (tether.controller.fl.rounds; storage: pg_rounds, contract RoundBook).
--
-- One row per (task, round number). `task` is the release name. At most one live
-- round (not Published/Failed) per task, enforced by a partial unique index, so two
-- replicas cannot open rounds side by side. `deadline` is Unix seconds.
-- fl_participants: the devices a round selected, in draw order (`position`), and,
-- once their update was accepted, its arrival order (`received_position`): a
-- device's update is taken once because the row is updated only while it is NULL,
-- under the round row's lock.

CREATE TABLE fl_rounds (
    task text NOT NULL,
    number integer NOT NULL CHECK (number >= 1),
    phase text NOT NULL CHECK (phase IN ('Open', 'Collecting', 'Extended', 'Aggregating', 'Published', 'Failed')),
    deadline double precision NOT NULL,
    target integer NOT NULL DEFAULT 0 CHECK (target >= 0),
    quorum integer NOT NULL DEFAULT 1 CHECK (quorum >= 1),
    extensions integer NOT NULL DEFAULT 0 CHECK (extensions >= 0),
    refused integer NOT NULL DEFAULT 0,
    late integer NOT NULL DEFAULT 0,
    reason text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, number)
);

CREATE UNIQUE INDEX fl_rounds_one_live_per_task ON fl_rounds (task) WHERE phase NOT IN ('Published', 'Failed');

CREATE TABLE fl_participants (
    task text NOT NULL,
    number integer NOT NULL,
    device_id text NOT NULL,
    position integer NOT NULL,
    received_position integer,
    received_at timestamptz,
    PRIMARY KEY (task, number, device_id),
    UNIQUE (task, number, position),
    FOREIGN KEY (task, number) REFERENCES fl_rounds (task, number) ON DELETE CASCADE
);
