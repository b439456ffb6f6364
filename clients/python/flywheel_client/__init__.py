"""flywheel_client."""
