"""Talking to engines: the keep-alive HTTP/1.1 client, the SSE relay and the proxy."""
