-- Server-side evaluation of federated rounds (docs/internals.md "Federated rounds"): the metrics of
-- each published round's global model on the task's held-out set ({"accuracy": .., "loss": ..}),
-- NULL when the round was not scored, and why scoring failed (the round is published regardless).
ALTER TABLE fl_rounds
    ADD COLUMN server_metrics jsonb,
    ADD COLUMN evaluation_error text;
