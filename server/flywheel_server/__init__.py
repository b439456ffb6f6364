"""flywheel_server."""
