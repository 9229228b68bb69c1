-- Which controller replica holds a device's Subscribe stream (`tether device list`, CONNECTED).
-- Set when the stream opens, cleared when it ends (only by the replica that set it: a reconnect to another
-- replica in between wins). A replica that dies leaves its value behind; readers show it only while that
-- replica's listener session is alive in pg_stat_activity (application_name 'tether-listener-<replica>').
ALTER TABLE devices ADD COLUMN IF NOT EXISTS connected_replica text;
