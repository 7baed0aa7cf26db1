"""Routing policies: baselines and predicted latency. Pure; no aiohttp."""
