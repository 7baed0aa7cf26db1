"""The gateway's view of its engines: the registry, health checks, in-process simulated
engines."""
