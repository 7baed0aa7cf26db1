"""The HTTP surface: handlers, errors, authentication, request parsing, the admin API."""
