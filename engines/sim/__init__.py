"""The simulated engine: a vLLM-like OpenAI server that behaves like vLLM in time."""
