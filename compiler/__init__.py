"""Frontend, pass pipeline, passes, sample data and verification."""
