"""Request bodies in gzip or deflate, decoded by the gateway in bounded steps.

The gateway's HTTP server runs with aiohttp's own decompression off (`auto_decompress=False`):
aiohttp decodes inside its protocol, before a handler runs, and answers what it cannot decode
(zstd without an optional package, a corrupt brotli stream) with a plain-text 400 or a dropped
connection. Here the handler checks the coding first (`check_encoding`: identity, gzip or
deflate) and decodes with zlib, never producing more than the body limit plus one byte, so a
compression bomb costs no more memory than the limit.
"""

from __future__ import annotations

import zlib

from aiohttp import web

from gateway.core.errors import ApiError


class Inflater:
    """Decodes one body's `encoding` ("gzip" or "deflate") chunk by chunk."""

    __slots__ = ("_d", "encoding", "size")

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        # deflate is zlib-wrapped by the RFC, raw in some clients: told apart by the first byte.
        self._d: zlib._Decompress | None = (
            zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        )
        self.size = 0

    def feed(self, data: bytes, limit: int) -> bytes:
        """The decoded bytes of `data`; HTTPRequestEntityTooLarge once the body passes
        `limit` bytes decoded, ApiError 400 when it is not valid `encoding`."""
        if self._d is None:
            raw = bool(data) and (data[0] & 0x0F) != 8  # not a zlib header: raw deflate
            self._d = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        out = bytearray()
        try:
            while data:
                chunk = self._d.decompress(data, limit - self.size + 1)
                self.size += len(chunk)
                if self.size > limit:
                    raise web.HTTPRequestEntityTooLarge(limit, self.size)
                out += chunk
                data = self._d.unconsumed_tail
        except zlib.error:
            raise self._invalid() from None
        return bytes(out)

    def finish(self) -> None:
        """The body ended: ApiError 400 when its stream did not."""
        if self._d is None or not self._d.eof:
            raise self._invalid("it ends before its compressed stream does")

    def _invalid(self, why: str = "it cannot be decoded") -> ApiError:
        return ApiError(
            400,
            f"The request body is not valid {self.encoding}: {why}.",
            param="Content-Encoding",
            code="invalid_body_encoding",
        )
