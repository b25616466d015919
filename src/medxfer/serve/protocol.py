"""HTTP/1.1 connections under hostile clients: timeouts, a head-size limit and a connection cap.

uvicorn's httptools protocol keeps a connection as long as the client wants: a connection that
never sends a request, a request head sent a byte at a time, a body that stops half-way, or a head
of 200 MB (httptools buffers it whole) are all held. :class:`GuardedProtocol` is that protocol with
:class:`Limits`:

- ``header_timeout``: from the connection (or the end of the previous response) to the end of the
  request head. An idle connection is closed; a partial head gets ``408`` and is closed.
- ``body_timeout``: the longest pause while a request body arrives (not counted while the server
  itself has stopped reading); then ``408`` and close.
- ``max_header_bytes``: a request head (request line and headers) above it gets ``431`` and the
  connection is closed, without buffering the rest.
- ``max_connections``: connections held at once by this process. Above it the connection that has
  waited longest for a request head is closed (idle and slow clients go first, clients with a
  request in flight stay); when every connection has a request in flight, the new one is closed.
- ``linger``, ``linger_bytes``: when a response goes out before its request body was received (a
  refused key, an upload over the limit, a head too large), the server stops reading it: it
  half-closes, discards what the client still sends for at most this long and this many bytes (so
  that a client that sends before it reads gets the answer instead of a reset), then closes.

uvicorn's own ``timeout_keep_alive`` still closes idle connections between requests.
Closed connections are counted and logged at most every ``LOG_EVERY`` seconds, one line.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("medxfer.serve")

LOG_EVERY = 10.0  # seconds between two summary lines about closed connections
_REASONS = {
    "idle": "idle past --header-timeout",
    "slow_head": "head not complete within --header-timeout (408)",
    "slow_body": "body paused past --body-timeout (408)",
    "head_too_large": "head above --max-header-kb (431)",
    "evicted": "waiting longest for a request when --max-connections was reached",
    "over_cap": "refused at --max-connections (every connection had a request in flight)",
}


@dataclass(frozen=True)
class Limits:
    """Connection limits of one server process (see the module docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 20.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1000
    linger: float = 2.0
    linger_bytes: int = 2**20


class Book:
    """Per server: connections waiting for a request head (oldest first) and counts of closed ones."""

    def __init__(self):
        self.waiting: collections.OrderedDict = collections.OrderedDict()
        self.closed: collections.Counter = collections.Counter()
        self._pending: collections.Counter = collections.Counter()
        self._last_log = 0.0

    def note(self, reason: str) -> None:
        self.closed[reason] += 1
        self._pending[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            parts = ", ".join(f"{n} {_REASONS[r]}" for r, n in sorted(self._pending.items()))
            level = logging.INFO if set(self._pending) == {"idle"} else logging.WARNING  # idle: browsers do it
            log.log(level, "closed connections: %s", parts)
            self._pending.clear()


def book_of(server_state) -> Book:
    book = getattr(server_state, "medxfer_book", None)
    if book is None:
        book = server_state.medxfer_book = Book()
    return book


class _CycleTransport:
    """The transport as one request cycle of uvicorn sees it: ``close()`` lets the client finish sending."""

    def __init__(self, transport, protocol: "GuardedProtocol", cycle):
        self._transport = transport
        self._protocol = protocol
        self._cycle = cycle

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_after_response(self._cycle)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`Limits` (``config.medxfer_limits``)."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: Limits = getattr(config, "medxfer_limits", None) or Limits()
        self.book = book_of(server_state)
        self._timer = None       # the deadline now running: head, body or linger
        self._head_bytes = 0     # bytes received since the last complete head (raw count)
        self._head_size = 0      # request line and headers of the head being parsed (exact count)
        self._in_body = False    # head complete, body not yet
        self._done = False       # refused or lingering: input is discarded
        self._dropped = 0        # bytes discarded since

    # ---------------------------------------------------------------------------- connection
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self.book.note("over_cap")
            self._done = True
            transport.close()
            return
        self._wait_for_head()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.book.waiting.pop(self, None)
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request head; False when none waits."""
        while self.book.waiting:
            oldest, _ = self.book.waiting.popitem(last=False)
            if oldest is not self and not oldest.transport.is_closing():
                self.book.note("evicted")
                oldest._done = True
                oldest._disarm()
                oldest.transport.close()
                return True
        return False

    def _wait_for_head(self) -> None:
        self._in_body, self._head_bytes = False, 0
        self.book.waiting[self] = None
        self.book.waiting.move_to_end(self)
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---------------------------------------------------------------------------- input
    def data_received(self, data: bytes) -> None:
        if self._done:  # lingering: drop what the client still sends, up to linger_bytes
            self._dropped += len(data)
            if self._dropped > self.limits.linger_bytes and not self.transport.is_closing():
                self.transport.close()
            return
        if self._in_body:
            self._arm(self.limits.body_timeout, self._body_timed_out)
        else:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._done and not self._in_body and self._head_bytes > self.limits.max_header_bytes:
            self._head_too_large()

    def on_message_begin(self) -> None:
        if not self._done:
            self._head_size = 0
            super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._done:
            self._head_size += len(url)
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._done:
            self._head_size += len(name) + len(value) + 4
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._done:
            return
        if self._head_size > self.limits.max_header_bytes:
            self._head_too_large()
            return
        self._head_bytes = 0
        self._in_body = True
        self.book.waiting.pop(self, None)
        self._arm(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _CycleTransport):
            cycle.transport = _CycleTransport(self.transport, self, cycle)
            cycle.on_response = lambda: self._response_done(cycle)

    def on_body(self, body: bytes) -> None:
        if not self._done:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def _response_done(self, cycle) -> None:
        """``cycle``'s response went out (then uvicorn's on_response_complete runs, unless the
        connection is ending: no pipelined request starts and no keep-alive timer is armed)."""
        if self._done or self.transport.is_closing():
            return
        self.on_response_complete()
        if self._done or self.transport.is_closing():
            return
        if cycle.more_body:  # answered before its body arrived: stop reading it
            self._linger()
        elif self.timeout_keep_alive_task is not None:  # idle again, no pipelined request started
            self._wait_for_head()

    # ---------------------------------------------------------------------------- endings
    def close_after_response(self, cycle) -> None:
        """``cycle`` closes the connection after its response: linger when its body is still coming."""
        if cycle.more_body and not self._done:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        self._done = True
        self._in_body = False
        self.book.waiting.pop(self, None)
        self.flow.resume_reading()  # read and drop, so the client is not reset while it sends
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self._arm(self.limits.linger, self.transport.close)

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._done or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.book.note("idle")
            self._done = True
            self.transport.close()
            return
        self.book.note("slow_head")
        self._refuse(408, "request_timeout", f"the request head did not arrive within {self.limits.header_timeout:g} s "
                     "(--header-timeout); send the request at once", linger=False)

    def _body_timed_out(self) -> None:
        self._timer = None
        if self._done or self.transport.is_closing() or not self._in_body:
            return
        if self.flow.read_paused:  # the server stopped reading, not the client
            self._arm(self.limits.body_timeout, self._body_timed_out)
            return
        self.book.note("slow_body")
        self._refuse(408, "request_timeout", f"the request body paused for more than {self.limits.body_timeout:g} s "
                     "(--body-timeout)", linger=False)

    def _head_too_large(self) -> None:
        self.book.note("head_too_large")
        self._refuse(431, "header_too_large", f"the request head is larger than {self.limits.max_header_bytes} bytes "
                     "(--max-header-kb); send fewer or shorter headers", linger=True)

    def _refuse(self, status: int, code: str, message: str, linger: bool) -> None:
        """Answer ``status`` with the API's JSON error (when no response has started) and end the connection."""
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's next receive() gets http.disconnect; its send() is dropped
            cycle.message_event.set()
        self._done = True
        self._in_body = False
        self.book.waiting.pop(self, None)
        if not started and not self.transport.is_closing():
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        log.debug("connection closed: %d %s", status, code)
        if linger and not started:
            self._linger()
        else:
            self.transport.close()
