"""The agent's websocket server: configuration handshake, event listing and file transfer.

`WsServer` listens, checks the token before the upgrade, answers the health check, enforces the
client limit and shuts down cleanly; each connection is an `edge.wssession.Session`, and file
reading is in `edge.wsfiles`. The protocol is in `docs/websocket.md`; the frames are
`edge.messages.ws`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge import __version__
from edge.bus import EventBus
from edge.errors import SettingsError
from edge.messages.ws import (
    AUTH_SCHEME,
    HEALTH_PATH,
    MAX_FRAME_BYTES,
    CloseCode,
    ErrorCode,
)
from edge.runtime import RuntimeConfig
from edge.settings import WsSettings
from edge.store import EventStore
from edge.wsauth import bearer_token, configured_token, token_matches
from edge.wssession import (
    ClientStalledError,
    HandshakeFailedError,
    Session,
    WsStats,
    close_with_error,
)

logger = logging.getLogger(__name__)

# Connections without a token in the Authorization header are upgraded so that they can send it
# in `hello`; until it checks out they are strangers. They get slots of their own, this many at
# once, and count toward `max_clients` only once authenticated: strangers holding idle
# connections open (each for up to hello_timeout_s) can then crowd out other clients that send
# the token in hello, never a controller that sends it in the header.
MAX_UNAUTHENTICATED_CONNECTIONS = 4


class WsServer:
    """Serves controllers over ws:// or wss://; run as one task of the agent's TaskGroup."""

    def __init__(
        self,
        settings: WsSettings,
        device_id: str,
        runtime: RuntimeConfig,
        store: EventStore,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.device_id = device_id
        self.runtime = runtime
        self.store = store
        self.bus = bus
        self.stats = WsStats()
        self.started = asyncio.Event()
        self.port: int | None = None
        self._token = configured_token(settings.token)
        self._sessions: set[Session] = set()  # authenticated: at most max_clients
        self._unauthenticated: set[Session] = set()  # waiting for hello.token

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert_file is not None

    @property
    def url(self) -> str:
        """The URL controllers should use (public_url if set)."""
        if self.settings.public_url:
            return self.settings.public_url
        host = self.settings.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        port = self.port if self.port is not None else self.settings.port
        return f"{'wss' if self.tls else 'ws'}://{host}:{port}"

    @property
    def stall_timeout_s(self) -> float:
        """How long a send may wait for a client that does not read: the keepalive's patience."""
        return self.settings.ping_interval_s + self.settings.ping_timeout_s

    @property
    def client_count(self) -> int:
        """Connections being served, authenticated or still waiting for hello."""
        return len(self._sessions) + len(self._unauthenticated)

    @property
    def unauthenticated_count(self) -> int:
        return len(self._unauthenticated)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then close every connection with 1001 and return."""
        if not self.settings.enabled:
            logger.info("websocket server disabled (SOUNDEDGE_WS__ENABLED=false)")
            return
        if self._token is None:
            logger.warning(
                "SOUNDEDGE_WS__TOKEN is not set: the websocket server refuses every client"
            )
        try:
            server = await serve(
                self._handle,
                self.settings.host,
                self.settings.port,
                process_request=self._process_request,
                compression=None,  # audio barely compresses; deflate would only cost CPU
                max_size=MAX_FRAME_BYTES,
                # Sends wait (drain) above this many buffered bytes: one chunk in flight.
                write_limit=self.settings.chunk_bytes,
                ping_interval=self.settings.ping_interval_s,
                ping_timeout=self.settings.ping_timeout_s,
                # A client that stopped answering pings will not answer a close frame either.
                close_timeout=min(self.settings.ping_timeout_s, 10.0),
                ssl=self._ssl_context(),
                server_header=f"soundedge/{__version__}",
            )
        except OSError as exc:
            raise SettingsError(
                f"SOUNDEDGE_WS__PORT: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            self.port = next(iter(server.sockets)).getsockname()[1]
            logger.info("websocket server listening on %s", self.url)
            self.started.set()
            await stop.wait()
        finally:
            self.started.clear()
            server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="agent stopping")
            await self._wait_closed(server)
            logger.info("websocket server stopped")

    async def _wait_closed(self, server: Server) -> None:
        """Wait for the closing handshakes; then drop clients that cannot even take a close
        frame (a stalled reader), so that stopping the agent is never held up by a client."""
        try:
            async with asyncio.timeout(min(self.settings.ping_timeout_s, 10.0)):
                await server.wait_closed()
        except TimeoutError:
            logger.warning("dropping %d clients that did not close in time", self.client_count)
            for session in [*self._sessions, *self._unauthenticated]:
                session.ws.transport.abort()
            await server.wait_closed()

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.tls_cert_file, self.settings.tls_key_file
        if cert is None or key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"SOUNDEDGE_WS__TLS_CERT_FILE/SOUNDEDGE_WS__TLS_KEY_FILE: cannot load {cert} "
                f"and {key}: {exc}"
            ) from exc
        return context

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer the health check; refuse a wrong Bearer token before the upgrade."""
        if request.path.split("?", 1)[0] == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self._token is None:
            self.stats.refused += 1
            return connection.respond(
                HTTPStatus.FORBIDDEN,
                "this device has no websocket token configured (SOUNDEDGE_WS__TOKEN); "
                "every client is refused\n",
            )
        header = request.headers.get("Authorization")
        if header is not None and not token_matches(self._token, bearer_token(header)):
            self.stats.refused += 1
            logger.warning("refused a client with a wrong token from %s", connection.remote_address)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "wrong websocket token\n")
            response.headers["WWW-Authenticate"] = f'{AUTH_SCHEME} realm="soundedge"'
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        # A wrong header token was refused before the upgrade: a header here is the right one.
        authenticated = ws.request is not None and self.headers_token_ok(ws.request.headers)
        if authenticated and len(self._sessions) >= self.settings.max_clients:
            await self._refuse(ws, self._max_clients_message())
            return
        if not authenticated and len(self._unauthenticated) >= MAX_UNAUTHENTICATED_CONNECTIONS:
            await self._refuse(
                ws,
                f"this agent holds at most {MAX_UNAUTHENTICATED_CONNECTIONS} connections waiting "
                "for hello.token at once; send the token in the Authorization header",
            )
            return
        session = Session(self, ws)
        (self._sessions if authenticated else self._unauthenticated).add(session)
        self.stats.connections += 1
        try:
            await session.run()
        except (ConnectionClosed, HandshakeFailedError, ClientStalledError):
            pass  # the peer left or the handshake failed; both are logged where they happen
        except Exception:
            # A bug, not a client's fault: log it and tell the client, keep the server running.
            self.stats.internal_errors += 1
            logger.exception("websocket session of %s failed", session.name)
            await close_with_error(
                ws, ErrorCode.INTERNAL, "internal error in the agent", CloseCode.INTERNAL_ERROR
            )
        finally:
            self._sessions.discard(session)
            self._unauthenticated.discard(session)
            logger.info("client %s disconnected (code %s)", session.name, ws.close_code)

    async def _refuse(self, ws: ServerConnection, message: str) -> None:
        self.stats.refused += 1
        logger.warning("refused a client from %s: %s", ws.remote_address, message)
        await close_with_error(ws, ErrorCode.TOO_MANY_CLIENTS, message, CloseCode.TRY_AGAIN_LATER)

    def _max_clients_message(self) -> str:
        return f"this agent serves at most {self.settings.max_clients} clients at once"

    def admit(self, session: Session) -> str | None:
        """Count a session that has authenticated toward max_clients; None if admitted, else
        why not (the session is then to be closed with `too_many_clients`)."""
        if session in self._sessions:
            return None  # authenticated by its header, counted since the upgrade
        if len(self._sessions) >= self.settings.max_clients:
            self.stats.refused += 1
            return self._max_clients_message()
        self._unauthenticated.discard(session)
        self._sessions.add(session)
        return None

    def headers_token_ok(self, headers: Headers) -> bool:
        return token_matches(self._token, bearer_token(headers.get("Authorization")))

    def check_token(self, presented: str | None) -> bool:
        return token_matches(self._token, presented)
