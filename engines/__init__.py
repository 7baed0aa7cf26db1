"""What an engine is: performance model, simulated engine, health and stats polling."""
