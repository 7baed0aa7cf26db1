"""Load tests that talk to the gateway over HTTP only."""
