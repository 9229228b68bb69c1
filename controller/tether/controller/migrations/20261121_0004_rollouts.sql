-- Staged rollouts (tether.controller.rollouts; MLTask spec.rollout).
--
-- releases.rollout: the operator's decision as validated by
--   tether.controller.rollouts.parse_rollout: {"version", "salt", "stage",
--   "action": progress|complete|rollback, "stages": [...]}; '{}' = no staging.
--   A change does not bump releases.version.
-- releases.rollout_state: what the controller fixed while following it:
--   {"version", "stagesHash", "stages": {"<index>": {"threshold", "startedAt"}}}:
--   the cohort threshold of every stage begun so far (fixed when the stage begins,
--   over the devices targeted then) and when it began.
-- releases.stable: the version devices outside the current stage keep (the last
--   one whose rollout completed): {"version", "manifestDigest", "target",
--   "trigger", "resources"}; NULL for a first release (nothing to keep).
-- deliveries.installed_at: when the device first reported the delivery's
--   version installed (coverage times: how long a stage took to reach 50/90/99 %).
-- devices.state: the participation state the device reported last
--   ({"charging": "true", "unmeteredNetwork": "false", "idle": "true"}).

ALTER TABLE releases ADD COLUMN rollout jsonb NOT NULL DEFAULT '{}';
ALTER TABLE releases ADD COLUMN rollout_state jsonb NOT NULL DEFAULT '{}';
ALTER TABLE releases ADD COLUMN stable jsonb;

ALTER TABLE deliveries ADD COLUMN installed_at timestamptz;

ALTER TABLE devices ADD COLUMN state jsonb NOT NULL DEFAULT '{}';
