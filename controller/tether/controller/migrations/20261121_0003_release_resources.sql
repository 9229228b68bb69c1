-- Per-run resource limits of a release (MLTask `spec.resources`), as validated by
-- tether.controller.releases.check_resources:
--   {"timeoutSeconds": N, "memoryMB": N, "cpuSeconds": N}, every key optional.
-- Sent to agents in DesiredTask.resources_json; a change bumps the release version.
-- '{}' (the default for releases stored before this column) means "the device's
-- own limits".

ALTER TABLE releases ADD COLUMN resources jsonb NOT NULL DEFAULT '{}';
