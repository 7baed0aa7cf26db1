"""State shared by gateway replicas: token buckets in memory or in Redis."""
