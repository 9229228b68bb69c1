"""The device end of the real-time tunnel: `ctx.emit(topic, payload)` to cloud consumers.

- `outbox`: the durable SQLite outbox in the state directory; a record's `seq`
  is its idempotency key (with the device id) and increases forever.
- `emitter`: what a task's `ctx.emit` is, inside the worker process (standard
  library only): a small framed request over the agent's Unix socket.
- `emitsocket`: the agent's side of that socket; checks topic, size and rate
  (`tether.spec.emits`) and appends to the outbox before it answers.
- `uplink`: drains the outbox to the controller's `TunnelService.Emit`,
  batched and gzip-compressed, one batch in flight, deleting what was acked.
- `relay`: the coordinator the daemon holds (`Tunnel`): grants, in-process
  emits (stream-processor outputs), start and stop.
"""
