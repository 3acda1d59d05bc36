"""Training loops (one per mode) and their small shared parts."""
