"""What clients do wrong over HTTP is logged as one line, never as a traceback.

aiohttp answers a malformed request (a request or header line longer than ``max_line_size`` or
``max_field_size``, 8190 bytes, a bad request line, a bad ``Content-Length``, TLS spoken to a
plain port ...) with a 400 itself, and logs it on the ``aiohttp.server`` logger at ERROR with a
traceback (only a bad method on a connection's first request is logged at DEBUG, still with its
traceback). A client that goes away mid-request or mid-response makes a handler's read or write
raise ``ConnectionResetError``, logged the same way. Anyone who can reach the port could fill
the log with tracebacks, so :class:`ClientErrorFilter` rewrites those records: a malformed
request becomes one INFO line (DEBUG where aiohttp chose that) naming the peer and the reason, a
vanished client one DEBUG line, and a flood is cut to :attr:`ClientErrorFilter.per_minute`
lines a minute with a count of the rest. Exceptions of any other kind keep their tracebacks:
they are the server's own bugs.

Handlers keep running when their client disconnects (aiohttp's ``handler_cancellation`` stays
off, its default): an upload already being stored finishes and is audited, rather than being
cancelled between the two.
"""

from __future__ import annotations

import logging
import time

from aiohttp.http_exceptions import HttpProcessingError

#: The logger aiohttp's request handler reports errors on.
AIOHTTP_SERVER_LOGGER = "aiohttp.server"


def _clean(text: str, limit: int = 200) -> str:
    """One printable line of at most ``limit`` characters (the text may quote the client's
    bytes, which must not start a new log line)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ClientErrorFilter(logging.Filter):
    """Turns aiohttp's records of malformed requests and vanished clients into one line each,
    at INFO and DEBUG, at most ``per_minute`` of them a minute."""

    def __init__(self, per_minute: int = 30) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._window = 0.0  # monotonic start of the current minute
        self._logged = 0  # lines logged in it
        self._suppressed = 0  # lines not logged in it

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what, level = f"bad HTTP request ({exc.code}): {exc.message}", logging.INFO
        elif isinstance(exc, ConnectionError):
            what, level = f"client went away: {exc}", logging.DEBUG
        else:
            return True
        # Never louder than aiohttp's own choice (it logs non-HTTP bytes on a connection's
        # first request, the usual internet noise, at DEBUG already).
        level = min(level, record.levelno)
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg = "%s%s"
        record.args = (_clean(what), f" (from {_clean(str(peer), 64)})" if peer else "")
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._window >= 60.0:
            if self._suppressed:
                assert isinstance(record.args, tuple)
                record.msg += " (%d more in the last minute not logged)"
                record.args = (*record.args, self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.per_minute:
            self._suppressed += 1
            return False
        self._logged += 1
        return True


def quiet_client_errors(logger_name: str = AIOHTTP_SERVER_LOGGER) -> ClientErrorFilter:
    """Install a :class:`ClientErrorFilter` on aiohttp's server logger (once; returns it).
    ``medverse serve`` does; an application that serves medverse itself may call it too."""
    logger = logging.getLogger(logger_name)
    for f in logger.filters:
        if isinstance(f, ClientErrorFilter):
            return f
    f = ClientErrorFilter()
    logger.addFilter(f)
    return f
