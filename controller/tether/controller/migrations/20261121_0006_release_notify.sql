-- Cross-replica fan-out: every change of a release row is announced on the
-- `tether_releases` channel in the same transaction (Postgres delivers a
-- NOTIFY only when, and only if, that transaction commits). Every controller
-- replica LISTENs on a dedicated connection and re-evaluates the change for
-- the devices connected to it (tether.controller.replicas).
--
-- Payload: {"release": text, "version": bigint, "origin": text}. `origin` is
-- the `tether.origin` setting of the writing session: a controller's pool sets
-- it to the replica id, so a replica knows which changes it already fanned out
-- itself. Anything else (a worker, psql) writes an empty origin, which every
-- replica treats as remote.
--
-- A change that affects which devices a release reaches but lives in another
-- table must call tether_release_changed(release) in its transaction.

CREATE FUNCTION tether_release_changed(name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    SELECT version INTO v FROM releases WHERE release = name;
    PERFORM pg_notify(
        'tether_releases',
        json_build_object(
            'release', name,
            'version', coalesce(v, 0),
            'origin', coalesce(current_setting('tether.origin', true), '')
        )::text
    );
END
$$;

CREATE FUNCTION tether_releases_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'tether_releases',
        json_build_object(
            'release', NEW.release,
            'version', NEW.version,
            'origin', coalesce(current_setting('tether.origin', true), '')
        )::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER releases_notify
    AFTER INSERT OR UPDATE ON releases
    FOR EACH ROW
    EXECUTE FUNCTION tether_releases_notify();
