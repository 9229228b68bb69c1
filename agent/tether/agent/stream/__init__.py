"""On-device stream processing: behaviour events in, task inputs out.

- `events`: the event model and its validation.
- `patterns`: event-sequence pattern specs, the trie matcher and the naive baseline.
- `windows`: count/time windows and per-key aggregations.
- `store`: the bounded SQLite event store (raw events never leave the device).
- `processor`: validate → store → match → fire; builds `ctx.inputs`.
- `server`: the local Unix-socket endpoint (`tether.agent.events.EventClient` is its client).

`events`, `patterns` and `windows` are pure (no I/O).
"""
