"""flywheel_learner."""
