"""The Flywheel wire contract: generated protobuf and gRPC stubs (see proto/flywheel_proto/v1)."""
