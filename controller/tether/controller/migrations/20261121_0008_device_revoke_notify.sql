-- Cross-replica revocation: revoking a device is announced on the
-- `tether_devices` channel in the revoking transaction, so the announcement
-- goes out when, and only if, the revocation commits (whoever made it: a
-- controller's RevokeDevice or psql). Every controller replica LISTENs for it
-- on the connection it already holds for `tether_releases`
-- (tether.controller.replicas), forgets the device's cached authentication and
-- ends the device's Subscribe stream if it holds one.
--
-- Payload: {"device": text, "event": "revoked", "origin": text}; `origin` as
-- for `tether_releases` (migration 0006). Deleting a device row announces the
-- same (a device that no longer exists must not keep a stream either).

CREATE FUNCTION tether_devices_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'tether_devices',
        json_build_object(
            'device', OLD.device_id,
            'event', 'revoked',
            'origin', coalesce(current_setting('tether.origin', true), '')
        )::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_revoke_notify
    AFTER UPDATE OF revoked ON devices
    FOR EACH ROW
    WHEN (NEW.revoked AND NOT OLD.revoked)
    EXECUTE FUNCTION tether_devices_notify();

CREATE TRIGGER devices_delete_notify
    AFTER DELETE ON devices
    FOR EACH ROW
    EXECUTE FUNCTION tether_devices_notify();
