-- A device's credential or facts changed (re-enrolment, credential renewal,
-- ReportBackends): announced on `tether_devices` with event "changed" in the
-- changing transaction. Every replica then drops its cached authentication of
-- the device (which also holds the attributes and backend choices that
-- targeting reads) and refreshes the facts of its stream, at once rather than
-- after `auth_cache_s`. Revocation keeps its own event (migration 0008).
--
-- Payload: {"device": text, "event": "changed", "origin": text}.

CREATE FUNCTION tether_devices_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'tether_devices',
        json_build_object(
            'device', NEW.device_id,
            'event', 'changed',
            'origin', coalesce(current_setting('tether.origin', true), '')
        )::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_changed_notify
    AFTER UPDATE OF credential_hash, attributes, backends, backend_choices ON devices
    FOR EACH ROW
    WHEN (
        NOT NEW.revoked
        AND (NEW.credential_hash, NEW.attributes, NEW.backends, NEW.backend_choices)
            IS DISTINCT FROM (OLD.credential_hash, OLD.attributes, OLD.backends, OLD.backend_choices)
    )
    EXECUTE FUNCTION tether_devices_changed();
