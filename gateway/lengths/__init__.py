"""Output-length prediction: features, the LightGBM predictor, the feature log, training.
No aiohttp."""
