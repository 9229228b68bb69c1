-- Backend selection results a device reports (ReportBackends): one entry per
-- model, {"model_key", "candidate", "latency_ms", "release", "model"}, the whole
-- set replaced on each report. Targeting sees the chosen "<engine>/<backend>"
-- values as the pseudo attribute tether.io/selected-backend.

ALTER TABLE devices ADD COLUMN backend_choices jsonb NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN backend_fingerprint text NOT NULL DEFAULT '';
