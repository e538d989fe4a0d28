"""The API's front door: rate limits, a concurrency limit, body deadlines and Host checks.

Write keys are public (they ship in shops' browsers), so what one key or one address may ask of
the API is bounded here, before the work reaches the database or Temporal:

- ingestion is counted in events (a batch of 3,000 costs 3,000) per write key and per client
  address, tracking hits in requests per client address, each in a token bucket; over one,
  429 with ``Retry-After`` (which the official Segment client waits out) and nothing stored;
  a batch with more events than a bucket holds is a 413 (only smaller batches can pass);
- at most ``KAERU_MAX_CONCURRENT_REQUESTS`` ingestion and tracking requests run at once; over
  it, 503 with ``Retry-After``;
- a request body must arrive within ``KAERU_BODY_TIMEOUT`` seconds (408), so a client that
  dribbles bytes holds a slot for that long at most;
- with ``KAERU_ALLOWED_HOSTS`` (always in ``kaeru dev``) only those ``Host`` names are answered
  (421): a web page whose name resolves to 127.0.0.1 (DNS rebinding) reads nothing.

The state lives in this process's memory: N API processes behind a balancer each allow the
limits, so together they allow N times them. ``/healthz`` is never limited.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kaeru.credentials import CredentialCache, Credentials
from kaeru.settings import Settings
from starter.deps import ApiError

#: The ingestion endpoints (Segment's names and their one-letter aliases).
INGESTION_PATHS = frozenset(
    f"/v1/{name}" for name in ("track", "identify", "page", "batch", "import", "t", "i", "p")
)
#: The open pixel, the click redirect and the unsubscribe link (public, limited alike).
TRACKING_PREFIXES = ("/t/o/", "/t/c/", "/u/")
HEALTH_PATH = "/healthz"
#: What ``kaeru dev`` always answers for: names and addresses that only reach this machine.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Buckets kept per limit; past it, full (idle) buckets are forgotten first, as they hold
#: nothing a new bucket would not.
MAX_BUCKETS = 100_000
#: Seconds between two log lines about refusals of one kind (a flood must not flood the log).
LOG_EVERY = 60.0

Network = IPv4Network | IPv6Network

log = logging.getLogger("kaeru.api.limits")


def split_list(value: str) -> list[str]:
    """The entries of a comma-separated setting, stripped, empty ones dropped."""
    return [entry.strip() for entry in value.split(",") if entry.strip()]


# ---- token buckets -----------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Rate:
    """One limit as the settings give it, and the words a refusal uses for it."""

    burst: int
    per_second: float
    whose: str  #: "this write key", "this client address"
    unit: str  #: "events", "requests"
    settings: str  #: the two settings that change it

    def describe(self) -> str:
        return (
            f"{self.whose} may send {self.burst} {self.unit} at once and "
            f"{self.per_second:g} per second ({self.settings})"
        )


class RateLimit:
    """A token bucket per caller: ``burst`` tokens, refilled at ``per_second``.

    A cost is at most the burst (:meth:`Limits.admit` refuses bigger ones): a batch bigger
    than the bucket could never be let through without letting the burst be exceeded.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}

    def _bucket(self, who: Hashable, now: float) -> _Bucket:
        bucket = self._buckets.get(who)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget(now)
            bucket = self._buckets[who] = _Bucket(float(self.rate.burst), now)
        else:
            refilled = bucket.tokens + (now - bucket.updated) * self.rate.per_second
            bucket.tokens = min(float(self.rate.burst), refilled)
            bucket.updated = now
        return bucket

    def _forget(self, now: float) -> None:
        full = [
            who
            for who, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate.per_second >= self.rate.burst
        ]
        for who in full:
            del self._buckets[who]
        excess = len(self._buckets) - MAX_BUCKETS * 9 // 10
        if excess > 0:
            # Callers in debt from very many addresses: forget the earliest seen, down to 90%,
            # so the table stays bounded and this scan runs once per tenth of it at most.
            for who in list(self._buckets)[:excess]:
                del self._buckets[who]

    def wait(self, who: Hashable, cost: int) -> float:
        """Seconds until ``who`` may spend ``cost`` (0: now; ``cost`` <= burst). Spends nothing."""
        bucket = self._bucket(who, self._clock())
        if bucket.tokens >= cost:
            return 0.0
        return (cost - bucket.tokens) / self.rate.per_second

    def take(self, who: Hashable, cost: int) -> None:
        """Spend ``cost`` (after :meth:`wait` said 0, with no await in between)."""
        self._bucket(who, self._clock()).tokens -= cost


def _limit(burst: int, per_second: float, whose: str, unit: str, names: str) -> RateLimit | None:
    if per_second <= 0:
        return None
    return RateLimit(Rate(burst, per_second, whose, unit, names))


# ---- who is asking -----------------------------------------------------------------------------


def _address(text: str) -> str | None:
    try:
        return str(ip_address(text.strip().strip("[]")))
    except ValueError:
        return None


def _caller(address: str) -> str:
    """The bucket of an address: IPv6 by its /64, which one subscriber usually holds whole."""
    try:
        ip = ip_address(address.strip("[]"))
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip_network(f"{ip}/64", strict=False))


def key_id(user: str) -> bytes:
    """How a write key is known in memory: a digest, never the key itself."""
    return hashlib.sha256(user.encode()).digest()


def event_count(body: bytes) -> int:
    """How many events a body carries: a batch's length, else one (also for unreadable JSON).

    The handlers parse the body again with the strict rules; this reading only prices it.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 1
    batch = data.get("batch") if isinstance(data, dict) else None
    return max(1, len(batch)) if isinstance(batch, list) else 1


# ---- Host names ------------------------------------------------------------------------------


def host_name(header: str) -> str:
    """The name part of a ``Host`` header or setting entry: lower case, no port, no final dot.

    IPv6 addresses come bracketed, as a ``Host`` header carries them (``[::1]``).
    """
    value = header.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    if value.count(":") > 1 and _address(value):
        return f"[{_address(value)}]"
    return value.rsplit(":", 1)[0].rstrip(".") if ":" in value else value.rstrip(".")


class AllowedHosts:
    """ASGI middleware: answer only requests whose ``Host`` is one of ``hosts`` (421 otherwise).

    ``/healthz`` is answered for any Host: a balancer's health check often names the
    instance's address, and the answer says nothing.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str], fix: str) -> None:
        self.app = app
        self.hosts = frozenset(host_name(h) for h in hosts)
        self.fix = fix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host", "")
        if host_name(given) in self.hosts:
            await self.app(scope, receive, send)
            return
        shown = given[:100] or "(none)"
        await _refuse(
            scope,
            receive,
            send,
            421,
            "host_not_allowed",
            f"this server does not answer for Host {shown!r} (a guard against DNS rebinding): "
            f"{self.fix}",
        )


def dev_hosts(settings: Settings) -> str:
    """What the dev stack answers for: loopback, KAERU_PUBLIC_URL's host, KAERU_ALLOWED_HOSTS.

    Returned as the comma-separated value of ``allowed_hosts``.
    """
    public = urlsplit(settings.public_url).hostname
    hosts = [*LOOPBACK_HOSTS, *([public] if public else []), *split_list(settings.allowed_hosts)]
    return ",".join(dict.fromkeys(host_name(h) for h in hosts))


# ---- the limits of one API process -------------------------------------------------------------


@dataclass
class Limits:
    """Everything the front door counts, for one API process (see the module docstring)."""

    settings: Settings
    in_flight: int = 0
    #: Requests refused, by code (``rate_limited``, ``too_many_events``, ``too_busy``,
    #: ``body_timeout``).
    refused: Counter[str] = field(default_factory=Counter)
    _logged: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.per_key = _limit(
            s.rate_limit_key_burst,
            s.rate_limit_key_per_second,
            "this write key",
            "events",
            "KAERU_RATE_LIMIT_KEY_BURST, KAERU_RATE_LIMIT_KEY_PER_SECOND",
        )
        self.per_client = _limit(
            s.rate_limit_client_burst,
            s.rate_limit_client_per_second,
            "this client address",
            "events",
            "KAERU_RATE_LIMIT_CLIENT_BURST, KAERU_RATE_LIMIT_CLIENT_PER_SECOND",
        )
        self.tracking = _limit(
            s.tracking_limit_burst,
            s.tracking_limit_per_second,
            "this client address",
            "open and click requests",
            "KAERU_TRACKING_LIMIT_BURST, KAERU_TRACKING_LIMIT_PER_SECOND",
        )
        self.proxies: list[Network] = [
            ip_network(entry, strict=False) for entry in split_list(s.trusted_proxies)
        ]
        #: The server key's digest: a shop's backend sends all its events from a few addresses,
        #: so the per-client limit (meant for browsers) does not apply to it; its key limit does.
        self.server_key = key_id(s.write_key.get_secret_value()) if s.write_key else None

    def note(self, code: str, why: str) -> None:
        """Count a refusal; log it at most once a minute per code, never naming the caller."""
        self.refused[code] += 1
        now = time.monotonic()
        last = self._logged.get(code)
        since, count_then = last if last is not None else (now - LOG_EVERY, 0)
        if now - since >= LOG_EVERY:
            log.warning(
                "refused %d request(s) with %s since the last report: %s",
                self.refused[code] - count_then,
                code,
                why,
            )
            self._logged[code] = (now, self.refused[code])

    def client(self, scope: Scope) -> str:
        """The client's address: the connection's, or X-Forwarded-For's past trusted proxies."""
        peer = scope.get("client")
        address = str(peer[0]) if peer else "unknown"
        if not self._trusted(address):
            return _caller(address)
        hops = [
            hop.strip()
            for value in Headers(scope=scope).getlist("x-forwarded-for")
            for hop in value.split(",")
            if hop.strip()
        ]
        # Each proxy appends the address it saw; the first untrusted one from the right is
        # the client (anything left of it was written by the client itself).
        for hop in reversed(hops):
            if not self._trusted(hop):
                return _caller(_address(hop) or hop)
        return _caller(_address(hops[0]) or hops[0]) if hops else _caller(address)

    def _trusted(self, address: str) -> bool:
        parsed = _address(address)
        if parsed is None or not self.proxies:
            return False
        ip = ip_address(parsed)
        return any(ip in network for network in self.proxies)

    def admit(
        self, limits: Sequence[tuple[RateLimit | None, Hashable]], cost: int, spend: bool = True
    ) -> None:
        """Spend ``cost`` in every limit (``spend`` False: only check), or none and raise.

        Raises:
            ApiError: 413 for a cost over a limit's burst (one batch with more events than
                may ever be sent at once: retrying cannot help, smaller batches do); 429 with
                ``Retry-After`` naming the tightest limit and its settings.
        """
        for limit, _ in limits:
            if limit is not None and cost > limit.rate.burst:
                self.note("too_many_events", limit.rate.describe())
                raise ApiError(
                    413,
                    "too_many_events",
                    f"this request carries {cost} {limit.rate.unit}, more than "
                    f"{limit.rate.describe()}: send smaller batches",
                )
        waits = [(limit.wait(who, cost), limit) for limit, who in limits if limit is not None]
        wait, limit = max(waits, default=(0.0, None), key=lambda pair: pair[0])
        if limit is not None and wait > 0:
            self.note("rate_limited", limit.rate.describe())
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests: {limit.rate.describe()}; retry after {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        for limit, who in limits:
            if limit is not None and spend:
                limit.take(who, cost)

    def admit_events(
        self, request: Request, key: str | None, count: int, spend: bool = True
    ) -> None:
        """Spend ``count`` events of ``key`` (None: no Basic auth) and of the client, or 429.

        Without Basic auth the key is not known before the body is read: only the client's
        limit applies. The server key is limited per key only (see ``server_key``).
        """
        who = self.client(request.scope)
        digest = key_id(key) if key else b""
        per_key = self.per_key if key else None
        server = (
            self.server_key is not None and hmac.compare_digest(digest, self.server_key)
        ) or _managed_server_key(request, digest)
        per_client = None if server else self.per_client
        self.admit([(per_key, digest), (per_client, who)], count, spend)


def _managed_server_key(request: Request, digest: bytes) -> bool:
    """Whether ``digest`` is a server key of ``kaeru keys`` as this process last read them
    (a key checked for the first time is checked by its client's limit too, once)."""
    cache = getattr(request.app.state, "credentials", None)
    known: Credentials | None = cache.peek() if isinstance(cache, CredentialCache) else None
    return bool(digest) and known is not None and known.keys.get(digest.hex()) == "server"


def limits_of(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


# ---- the middleware ------------------------------------------------------------------------


class BodyTimeout(Exception):
    """The request body did not arrive within ``KAERU_BODY_TIMEOUT`` seconds."""


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse({"code": code, "message": message}, status, headers=headers)
    await response(scope, receive, send)


class FrontDoor:
    """ASGI middleware: the concurrency limit, tracking rate limits and body deadlines.

    Ingestion's rate limits are spent in :func:`starter.app.read_body`, where the number of
    events is known.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        tracking = path.startswith(TRACKING_PREFIXES)
        if not tracking and path not in INGESTION_PATHS:
            await self._within_deadline(scope, receive, send)
            return
        limits = self.limits
        if limits.in_flight >= limits.settings.max_concurrent_requests:
            limits.note("too_busy", "KAERU_MAX_CONCURRENT_REQUESTS")
            await _refuse(
                scope,
                receive,
                send,
                503,
                "too_busy",
                f"this API process is already answering {limits.in_flight} requests "
                "(KAERU_MAX_CONCURRENT_REQUESTS): retry in a second",
                {"Retry-After": "1"},
            )
            return
        if tracking:
            try:
                limits.admit([(limits.tracking, limits.client(scope))], 1)
            except ApiError as refused:
                await _refuse(
                    scope, receive, send, 429, refused.code, refused.message, refused.headers
                )
                return
        limits.in_flight += 1
        try:
            await self._within_deadline(scope, receive, send)
        finally:
            limits.in_flight -= 1

    async def _within_deadline(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; if its body is not in after ``KAERU_BODY_TIMEOUT`` s, answer 408."""
        timeout = self.limits.settings.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        body_done = timed_out = started = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done, timed_out
            if body_done or started:  # reads for a disconnect may wait any time
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_unless_timed_out(message: Message) -> None:
            nonlocal started
            if timed_out and not started:
                return  # whatever the app made of the missing body, the answer is a 408
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_by_deadline, send_unless_timed_out)
        except BodyTimeout:
            if started:
                raise
        if timed_out and not started:
            self.limits.note("body_timeout", "KAERU_BODY_TIMEOUT")
            await _refuse(
                scope,
                receive,
                send,
                408,
                "body_timeout",
                f"the request body took longer than {timeout:g} s to arrive "
                "(KAERU_BODY_TIMEOUT): send it at once, or in smaller batches",
                {"Connection": "close"},
            )


def install(app: FastAPI, settings: Settings) -> None:
    """Put the front door before ``app``: Host check (if configured) outermost, then limits."""
    app.state.limits = Limits(settings)
    app.add_middleware(FrontDoor, limits=app.state.limits)
    if hosts := split_list(settings.allowed_hosts):
        app.add_middleware(
            AllowedHosts,
            hosts=hosts,
            fix="add the name to KAERU_ALLOWED_HOSTS (comma-separated)",
        )
