"""Fairway gateway: the request path from authentication to accounting."""
