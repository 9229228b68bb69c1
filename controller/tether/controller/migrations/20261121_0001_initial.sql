-- Tether system of record, version 1.
-- Applied by tether.controller.db.migrate() at controller start, each file once,
-- in name order, inside one transaction, recorded in schema_migrations.

CREATE TABLE devices (
    device_id        text PRIMARY KEY,
    credential_hash  bytea NOT NULL,            -- sha256 of the per-device credential secret
    attributes       jsonb NOT NULL DEFAULT '{}',
    backends         text[] NOT NULL DEFAULT '{}',
    enrolled_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz,
    revoked          boolean NOT NULL DEFAULT false
);

CREATE TABLE blobs (
    digest      text PRIMARY KEY,                -- sha256:<hex>
    size        bigint NOT NULL CHECK (size >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE manifests (
    digest      text PRIMARY KEY,                -- sha256 of body
    body        bytea NOT NULL,                  -- canonical JSON bytes
    signature   bytea NOT NULL DEFAULT '',
    key_id      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE releases (
    release          text PRIMARY KEY,           -- "<namespace>/<name>"
    version          bigint NOT NULL,            -- bumped when content or policy changes
    generation       bigint NOT NULL,            -- MLTask metadata.generation last applied
    manifest_digest  text NOT NULL REFERENCES manifests(digest),
    target           jsonb NOT NULL DEFAULT '{}',
    trigger          jsonb NOT NULL DEFAULT '{}',
    aggregation      jsonb NOT NULL DEFAULT '{}',
    paused           boolean NOT NULL DEFAULT false,
    deleted          boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per (release, device): where that device stands with that release.
CREATE TABLE deliveries (
    release      text NOT NULL REFERENCES releases(release) ON DELETE CASCADE,
    device_id    text NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    version      bigint NOT NULL,
    state        text NOT NULL,                  -- notified|downloading|installed|running|succeeded|failed|refused|uninstalled
    message      text NOT NULL DEFAULT '',
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release, device_id)
);
CREATE INDEX deliveries_release_state ON deliveries (release, version, state);

-- Device uploads. The idempotency key makes a retried or replayed upload a no-op.
CREATE TABLE results (
    id               bigserial PRIMARY KEY,
    release          text NOT NULL REFERENCES releases(release) ON DELETE CASCADE,
    version          bigint NOT NULL,
    device_id        text NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    idempotency_key  text NOT NULL,
    sample_count     bigint NOT NULL CHECK (sample_count >= 0),
    metrics          jsonb NOT NULL DEFAULT '{}',
    counts           jsonb NOT NULL DEFAULT '{}',
    tensors          jsonb NOT NULL DEFAULT '[]', -- [{"name","shape","data": base64 float64 LE}]
    duration_s       double precision NOT NULL DEFAULT 0,
    received_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, idempotency_key)
);
CREATE INDEX results_release_version ON results (release, version, id);

-- One aggregate per (release, version): upserted by the Celery worker.
CREATE TABLE aggregates (
    release        text NOT NULL REFERENCES releases(release) ON DELETE CASCADE,
    version        bigint NOT NULL,
    round          bigint NOT NULL DEFAULT 0,     -- bumped on every recomputation
    result_count   bigint NOT NULL,
    through_id     bigint NOT NULL,               -- highest results.id folded in
    body           jsonb NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release, version)
);
