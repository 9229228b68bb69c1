"""Tether wire contract: generated protobuf and gRPC stubs."""
