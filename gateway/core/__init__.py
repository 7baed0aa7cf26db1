"""The gate core: admission (token buckets, OIT), fairness queues, dispatch and the in-flight
ledger. Pure and synchronous; no aiohttp."""
