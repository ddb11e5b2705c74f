"""Large payloads beside a Flower message: named by SHA-256, moved over plain HTTP(S), checked on arrival.

A Flower message carries a step or a result whole up to ``flip_core.wire.INLINE_LIMIT``. A larger
payload (a model of millions of parameters) would cross the SuperLink as hundreds of
content-addressed objects, one HTTP call each, with copies at every layer. Instead the message
carries only the payload's SHA-256 and size, and the bytes move once each way between the hub's
coordinator and the site, over the same TLS fleet address (the fleet front's ``/site/`` routes),
with the site's own token. The receiver checks the hash before anything reads the bytes
(:func:`verified`).

This module is the client both ends use (``http.client``, no third-party code on the byte path):
one request per payload, the body sent from the bytes as they are (no copy), the answer read
straight into a buffer of the announced size (no copy beyond the socket's), and checked once, by the
receiver, against the SHA-256 its message names (``flip_core.wire.content_to_blob``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from flip_core.errors import FlipError

READ_CHUNK = 4 << 20  # bytes read from the socket at a time
TIMEOUT_SECONDS = 120.0  # a stalled transfer (no byte for this long) is given up


class BulkError(FlipError):
    """A payload could not be moved, or the bytes that came are not the ones its reference names."""


class BulkUnreachable(BulkError):
    """The other end could not be reached, or the connection broke: trying again may work."""


def digest(blob: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def verified(blob: bytes | bytearray | memoryview, sha256: str, size: int) -> None:
    """Raise :class:`BulkError` unless ``blob`` is the ``size`` bytes whose SHA-256 is ``sha256``."""
    if len(blob) != size:
        raise BulkError(f"payload {sha256[:12]} arrived with {len(blob)} bytes, not the {size} its message names")
    if digest(blob) != sha256:
        raise BulkError(f"payload {sha256[:12]} arrived altered: its SHA-256 is not the one its message names")


@dataclass(frozen=True)
class BulkClient:
    """Puts and gets payloads at ``base`` (``http://`` or ``https://`` with the consortium's CA)."""

    base: str
    token: str
    cafile: str | None = None

    def _connection(self) -> http.client.HTTPConnection:
        url = urlsplit(self.base)
        host, port = url.hostname or "127.0.0.1", url.port
        if url.scheme == "https":
            context = ssl.create_default_context(cafile=self.cafile)
            return http.client.HTTPSConnection(host, port, timeout=TIMEOUT_SECONDS, context=context)
        return http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)

    def _path(self, path: str) -> str:
        return urlsplit(self.base).path.rstrip("/") + path

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def put(self, path: str, blob: bytes | bytearray | memoryview) -> None:
        """Send ``blob`` as the body of ``PUT path``; a refusal is raised with the server's sentence."""
        conn = self._connection()
        try:
            headers = {**self._headers(), "Content-Type": "application/octet-stream", "Content-Length": str(len(blob))}
            conn.request("PUT", self._path(path), body=memoryview(blob), headers=headers)
            response = conn.getresponse()
            answer = response.read(64 << 10)
            if response.status >= 300:
                raise BulkError(f"PUT {path} was refused ({response.status}): {_sentence(answer)}")
        except (OSError, http.client.HTTPException) as exc:
            raise BulkUnreachable(f"PUT {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    def get(self, path: str, size: int) -> bytearray:
        """The ``size`` bytes of ``GET path`` (the caller checks them against the hash it was given)."""
        conn = self._connection()
        try:
            conn.request("GET", self._path(path), headers=self._headers())
            response = conn.getresponse()
            if response.status != 200:
                raise BulkError(f"GET {path} was refused ({response.status}): {_sentence(response.read(64 << 10))}")
            length = response.getheader("content-length")
            if length is None or int(length) != size:
                raise BulkError(f"GET {path} answered {length} bytes, not the {size} its message names")
            buffer = bytearray(size)
            view = memoryview(buffer)
            got = 0
            while got < size:
                n = response.readinto(view[got : min(size, got + READ_CHUNK)])
                if not n:
                    raise BulkUnreachable(f"GET {path} broke off after {got} of {size} bytes")
                got += n
        except (OSError, http.client.HTTPException) as exc:
            raise BulkUnreachable(f"GET {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        return buffer

    def delete(self, path: str) -> None:
        conn = self._connection()
        try:
            conn.request("DELETE", self._path(path), headers=self._headers())
            conn.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            raise BulkUnreachable(f"DELETE {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()


def _sentence(answer: bytes) -> str:
    text = answer.decode("utf-8", "replace").strip()
    if text.startswith("{") and '"error"' in text:
        try:
            return str(json.loads(text)["error"])
        except (ValueError, KeyError, TypeError):
            pass
    return text[:300] or "no reason given"


__all__ = ["BulkClient", "BulkError", "BulkUnreachable", "digest", "verified"]
