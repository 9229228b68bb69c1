"""The cloud end of the real-time tunnel: device batches in, broker records out, consumers.

- `brokers`: the `Broker` (what the controller publishes to) and `Consumer`
  (what a cloud consumer reads with) Protocols and the record types.
- `broker_urls`: `open_broker(url)`: a URL scheme picks the implementation
  (`redis://`, `rediss://`, `unix://` built in; any other scheme from the
  `tether.tunnel_brokers` entry-point group; `python:module:factory` for a
  dotted path).
- `redis_streams`: the default, Redis Streams: one stream per topic, XADD with
  MAXLEN ~, per-device de-duplication by idempotency key in the same Lua
  script, consumer groups with XREADGROUP/XACK and XAUTOCLAIM of entries a
  dead consumer left pending.
- `emit_checks` (pure): a batch's shape and contents against `tether.spec.emits`.
- `tunnel_service`: the thin `TunnelService` servicer: checks, the per-device
  rate, publish, ack.
"""
