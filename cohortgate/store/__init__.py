"""State and event transport: the state file, Redis, and the event streams to the controller."""
