"""The shared spec grammar: what an MLTask says (targets, rollout documents, triggers, versions, stream patterns).

Parsed once here and used alike by the operator (validation at apply time) and the controller. Pure: no I/O.
"""
