"""The shared spec grammar: what an MLTask says (targets, rollout documents, resources, triggers, versions, streams).

Parsed once here and used alike by the operator (validation at apply time) and the controller; `wire` is the
one place these values meet the proto messages. Pure: no I/O; imports only the standard library,
tether.common.errors and tether.proto.
"""
