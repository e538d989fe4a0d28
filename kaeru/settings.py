"""Every setting of kaeru, read from ``KAERU_*`` environment variables or ``.env``."""

from __future__ import annotations

import base64
import binascii
from datetime import time, timedelta
from functools import lru_cache
from ipaddress import ip_network
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the embedded stack keeps its files (SQLite, Temporal history, caught mail).
STATE_DIR = Path(".kaeru")


def seconds_or_iso(value: object) -> object:
    """A duration's raw value as pydantic should read it: a string of seconds (``86400``,
    ``86400.0``) becomes a ``timedelta``; ISO 8601 (``P1D``) or ``HH:MM:SS`` pass through.
    The one reader of durations, for these settings and every journey's."""
    if isinstance(value, str):
        try:
            return timedelta(seconds=float(value.strip()))
        except (ValueError, OverflowError):
            return value  # ISO 8601 (P1D, PT30M) or HH:MM:SS, which pydantic reads
    return value


def positive_duration(value: object) -> object:
    """Refuse a zero or negative duration; anything else passes."""
    if isinstance(value, timedelta) and value.total_seconds() <= 0:
        raise ValueError("must be a positive duration, e.g. 86400 or P1D")
    return value


def known_timezone(name: str) -> ZoneInfo | None:
    """The IANA time zone ``name`` (``Asia/Tokyo``), or None when it is not one."""
    try:
        return ZoneInfo(name.strip()) if name and name.strip() else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


def clock_time(value: str) -> time:
    """``HH:MM`` (24-hour) as a time of day.

    Raises:
        ValueError: not ``HH:MM``.
    """
    hours, colon, minutes = value.strip().partition(":")
    if colon and hours.isdigit() and minutes.isdigit() and len(minutes) == 2:
        if int(hours) < 24 and int(minutes) < 60:
            return time(int(hours), int(minutes))
    raise ValueError(f"{value!r} is not a time of day as HH:MM (24-hour), e.g. 21:00 or 08:30")


class Settings(BaseSettings):
    """kaeru's configuration. Durations accept seconds (``86400``) or ISO 8601 (``P1D``)."""

    model_config = SettingsConfigDict(env_prefix="KAERU_", env_file=".env", extra="ignore")

    # Temporal
    temporal_address: str | None = Field(
        None, description="host:port of Temporal; unset, `kaeru dev` starts a dev server"
    )
    temporal_tls: bool = Field(False, description="connect to Temporal over TLS (Temporal Cloud)")
    temporal_api_key: SecretStr | None = Field(
        None, description="Temporal Cloud API key (implies TLS)"
    )
    temporal_tls_cert: Path | None = Field(
        None,
        description="path to the PEM client certificate for mTLS (Temporal Cloud); needs "
        "KAERU_TEMPORAL_TLS_KEY; implies TLS",
    )
    temporal_tls_key: Path | None = Field(
        None,
        validate_default=True,
        description="path to the PEM private key of KAERU_TEMPORAL_TLS_CERT",
    )
    temporal_tls_ca: Path | None = Field(
        None,
        description="path to the PEM CA that signed Temporal's server certificate; unset: the "
        "system's trusted roots (right for Temporal Cloud)",
    )
    temporal_tls_server_name: str | None = Field(
        None,
        description="name to send (SNI) and to verify Temporal's server certificate against, "
        "when it differs from the host of KAERU_TEMPORAL_ADDRESS",
    )
    temporal_namespace: str = Field("default", description="Temporal namespace of every journey")
    task_queue: str = Field("kaeru", description="task queue the worker polls and journeys run on")
    temporal_ui_port: int = Field(8233, description="port of the dev server's web UI (`kaeru dev`)")
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="address the worker's Prometheus endpoint listens on (0.0.0.0: every "
        "interface, for a scraper on another host)",
    )
    worker_metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="port of the worker's Prometheus endpoint (`/metrics`: the Temporal SDK's "
        "and kaeru's journey metrics); 0 or empty: off",
    )
    max_concurrent_workflow_tasks: int = Field(
        50, ge=1, description="cap on workflow tasks a worker runs at once"
    )
    max_concurrent_activities: int = Field(
        100, ge=1, description="cap on activities a worker runs at once"
    )

    # Storage
    database_url: str | None = Field(
        None, repr=False, description="SQLAlchemy URL; unset: SQLite in .kaeru/"
    )
    state_dir: Path = Field(
        STATE_DIR, description="where `kaeru dev` keeps SQLite, Temporal history and caught mail"
    )

    # API
    write_key: SecretStr | None = Field(
        None,
        description="server write key (trusted: shop backend, server-side Segment); "
        "ingestion requires it or a key made by `kaeru keys create`",
    )
    browser_write_key: SecretStr | None = Field(
        None,
        description="browser write key (analytics.js; public, untrusted): views, carts, pages "
        "and ending a journey only; unset: no browser key",
    )
    trust_browser_orders: bool = Field(
        False,
        description="count browser `Order Completed` as orders (revenue, coupons): only for "
        "shops with no server-side tracking",
    )
    operator_token: SecretStr | None = Field(
        None,
        description="bearer token of the admin API (`Authorization: Bearer ...`), the bootstrap "
        "operator (role operator; `kaeru operators add` makes accounts); unset and no account: "
        "the admin API answers 503 (`kaeru dev` makes one)",
    )
    credentials_cache_ttl: float = Field(
        5.0,
        ge=0,
        description="seconds an API process keeps the write keys and operator accounts of the "
        "database (`kaeru keys`, `kaeru operators`) before reading them again: a revoke takes "
        "effect within this time in every API process",
    )
    api_url: str | None = Field(
        None,
        description="base URL of a remote kaeru API (https://kaeru.example.com); set, `kaeru "
        "kill-switch` and `kaeru journeys pause|resume|cancel` steer it through its admin API "
        "with KAERU_OPERATOR_TOKEN instead of the database and Temporal",
    )
    max_clock_skew: float = Field(
        86400.0,
        gt=0,
        description="seconds an event's timestamp may be ahead of the server's clock; further "
        "ahead, it is clamped to the time of receipt",
    )
    max_traits: int = Field(
        100, ge=1, description="most traits a customer's profile holds (merged); over it: refused"
    )
    max_traits_bytes: int = Field(
        16 * 1024,
        ge=1,
        description="most bytes a customer's traits take as JSON (merged); over it: refused",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="signs tracking links, at least 32 bytes; unset: generated once and kept "
        "in the database",
    )
    legacy_secret_key: SecretStr | None = Field(
        None,
        description="a former KAERU_SECRET_KEY (any length): only verifies the links of emails "
        "sent before tracking tokens became opaque, until they expire; never signs",
    )
    tracking_ttl: timedelta = Field(
        timedelta(days=90),
        description="how long after its email was sent a tracking link records opens and "
        "clicks (seconds or ISO 8601); later, the pixel still answers and a click goes to "
        "KAERU_SHOP_URL, recording nothing",
    )

    #: An HMAC-SHA256 key shorter than this is weaker than the hash it keys.
    min_secret_key_bytes: ClassVar[int] = 32

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        length = len(value.get_secret_value().encode()) if value is not None else 0
        if 0 < length < cls.min_secret_key_bytes:
            raise ValueError(
                f"must be at least {cls.min_secret_key_bytes} bytes: generate one with `python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'`, or unset it and kaeru "
                "generates one and keeps it in the database. Set the old value as "
                "KAERU_LEGACY_SECRET_KEY so links in emails already sent keep working"
            )
        return value

    public_url: str = Field("http://localhost:8000", description="base of tracking links")
    api_host: str = Field("127.0.0.1", description="address the API listens on")
    api_port: int = Field(8000, description="port the API listens on")
    metrics_token: SecretStr | None = Field(
        None,
        description="bearer token `/metrics` needs (`Authorization: Bearer ...`); unset: "
        "`/metrics` is open, so keep the API's port on the internal network",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "log lines of `kaeru api`, `worker` and `dev`: `text`, or `json` (one object a "
            "line with time, level, logger, message, trace_id and span_id)"
        ),
    )
    max_event_bytes: int = Field(32 * 1024, description="largest event accepted (413 above it)")
    max_batch_bytes: int = Field(
        500 * 1024, description="largest `/v1/batch` body accepted (413 above it)"
    )

    # Routing
    route_max_attempts: int = Field(
        10,
        ge=1,
        description="failed deliveries of one event before the router parks it for an operator",
    )
    max_start_event_age: timedelta = Field(
        timedelta(days=7),
        description="a journey-starting event older than this (its timestamp) starts no journey",
    )

    # Limits (kept in each API process's memory: N processes allow N times these)
    rate_limit_key_burst: int = Field(
        5000, ge=1, description="events one write key may send at once (429 above it)"
    )
    rate_limit_key_per_second: float = Field(
        1000.0, ge=0, description="events per second one write key may keep sending; 0: off"
    )
    rate_limit_client_burst: int = Field(
        1000, ge=1, description="events one client address may send at once (429 above it)"
    )
    rate_limit_client_per_second: float = Field(
        100.0, ge=0, description="events per second one client address may keep sending; 0: off"
    )
    tracking_limit_burst: int = Field(
        1000, ge=1, description="open/click hits one client address may make at once (429 above)"
    )
    tracking_limit_per_second: float = Field(
        100.0, ge=0, description="open/click hits per second one client address may keep; 0: off"
    )
    max_concurrent_requests: int = Field(
        128, ge=1, description="ingestion and tracking requests in flight per process (503 above)"
    )
    body_timeout: float = Field(
        10.0, gt=0, description="seconds a request body may take to arrive (408 after it)"
    )
    trusted_proxies: str = Field(
        "",
        description="comma-separated proxy addresses or networks whose X-Forwarded-For names "
        "the client; empty: the connection's address is the client",
    )
    allowed_hosts: str = Field(
        "",
        description="comma-separated Host names the API answers (421 for others); empty: any; "
        "`kaeru dev` always allows loopback names and KAERU_PUBLIC_URL's host",
    )

    @field_validator("worker_metrics_port", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return 0 if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for entry in filter(None, (part.strip() for part in value.split(","))):
            try:
                ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network, e.g. 10.0.0.0/8,127.0.0.1"
                ) from None
        return value

    # Email
    smtp_host: str | None = Field(
        None, description="SMTP relay host; unset: `kaeru dev` starts a mail catcher"
    )
    smtp_port: int = Field(1025, description="SMTP port (the mail catcher's with `kaeru dev`)")
    smtp_username: str | None = Field(None, description="SMTP user name; unset: no AUTH")
    smtp_password: SecretStr | None = Field(None, description="SMTP password")
    smtp_starttls: bool = Field(False, description="upgrade the SMTP connection with STARTTLS")
    smtp_tls: bool = Field(False, description="connect to SMTP over TLS from the start (port 465)")
    smtp_timeout: float = Field(30.0, description="seconds an SMTP step may take")
    mail_from: str = Field(
        "Kaeru Shop <shop@kaeru.localhost>", description="From address of every email"
    )
    mail_catcher_port: int = Field(
        8025, description="port of the mail catcher's web inbox (`kaeru dev`)"
    )

    # Shop
    shop_name: str = Field("Kaeru Shop", description="shop name shown in emails")
    shop_url: str = Field("https://shop.example", description="shop home page, linked from emails")
    cart_url: str = Field("https://shop.example/cart", description="link back to the cart")
    image_origins: str = Field(
        "",
        description="more https origins product images may come from, comma-separated "
        "(e.g. `https://cdn.shopify.com`); links stay on the shop's own",
    )

    # Ads
    meta_graph_url: str = Field(
        "https://graph.facebook.com/v21.0", description="Meta Graph API base URL"
    )
    meta_access_token: SecretStr | None = Field(
        None, description="Meta access token; with KAERU_META_AUDIENCE_ID, audiences go to Meta"
    )
    meta_audience_id: str | None = Field(
        None, description="Meta custom audience id; unset: the local audience store"
    )
    ad_campaign: str = Field(
        "kaeru-cart-retargeting",
        description="utm_campaign (context.campaign.name) that marks a retargeting-ad click",
    )

    # Journeys (each journey's own settings are KAERU_<KIND>_*: see kaeru/journeys.py)
    journey_modules: str = Field(
        "",
        description="comma-separated modules with more journeys (a shop's own, outside this "
        "repo), e.g. `shop.journeys`; the workflows package is always searched",
    )
    audience_sweep_interval: timedelta = Field(
        timedelta(minutes=15),
        description="how often the audience sweeper retries removals from ad audiences that "
        "failed for good (each failing one waits longer, up to a day)",
    )

    # ---- stream B (messages) settings ----
    topic_window: timedelta = Field(
        timedelta(days=7),
        description="a marketing email is not sent when one on the same topic (the same cart, "
        "from whichever journey) went to the customer within this time (seconds or ISO 8601); "
        "transactional emails ignore it",
    )

    # ---- consent (kaeru/consent.py) settings ----
    unknown_consent_is_yes: bool = Field(
        False,
        description="send marketing messages to customers whose consent is unknown (never "
        "said yes or no); off, only customers who said yes get them. Transactional messages "
        "never ask",
    )

    # ---- consent: gate (caps, priority, quiet hours) settings ----
    cap_per_day: int = Field(
        1,
        ge=1,
        description="most marketing emails a customer gets in any 24 hours, across all "
        "journeys (a capped one waits for the next free slot); transactional ones don't count",
    )
    cap_per_week: int = Field(
        3,
        ge=1,
        description="most marketing emails a customer gets in any 7 days, across all journeys",
    )
    shop_timezone: str = Field(
        "UTC",
        description="IANA time zone (e.g. Europe/Berlin) of quiet hours for customers whose own "
        "time zone is unknown",
    )
    quiet_start: str = Field(
        "21:00",
        description="local time (HH:MM, the customer's time zone) from which no marketing "
        "email goes out; equal to KAERU_QUIET_END: no quiet hours",
    )
    quiet_end: str = Field(
        "08:00", description="local time (HH:MM) at which marketing emails may go out again"
    )

    @field_validator("shop_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if known_timezone(value) is None:
            raise ValueError(
                f"{value!r} is not an IANA time zone name, e.g. UTC, Europe/Berlin or "
                "America/New_York (if every name is refused, this system has no time-zone "
                "data: install the tzdata package)"
            )
        return value

    @field_validator("quiet_start", "quiet_end")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        clock_time(value)
        return value

    # ---- consent: unsubscribe and DKIM settings ----
    shop_address: str = Field(
        "",
        description="the shop's postal address as printed (legal name, street, town, "
        "country), in the footer of every marketing email (CAN-SPAM requires one); empty: "
        "the footer shows only the unsubscribe link",
    )
    unsubscribe_mailto: str = Field(
        "",
        description="an address that unsubscribes whoever writes to it (your mail system "
        "must act on it), added to List-Unsubscribe with the link's token as the subject; "
        "empty: the header has the HTTPS link only",
    )
    secret_key_previous: SecretStr | None = Field(
        None,
        description="the former KAERU_SECRET_KEY during a key rotation: unsubscribe links "
        "signed with it keep working while it is set; never signs",
    )
    dkim_selector: str = Field(
        "",
        description="DKIM selector (`s=`): the public key is the TXT record "
        "`<selector>._domainkey.<domain>`; with the domain and the key set, every email is "
        "signed",
    )
    dkim_domain: str = Field(
        "", description="DKIM signing domain (`d=`), the domain of KAERU_MAIL_FROM or its parent"
    )
    dkim_private_key: Path | None = Field(
        None,
        validate_default=True,
        description="path to the DKIM private key (RSA, PEM); read when the worker starts",
    )

    @field_validator("unsubscribe_mailto")
    @classmethod
    def _mailto(cls, value: str) -> str:
        address = value.strip().removeprefix("mailto:")
        local, _, domain = address.partition("@")
        odd = any(c in ' <>,?"' or ord(c) < 32 or ord(c) == 127 for c in address)
        if address and (not local or not domain or "@" in domain or odd):
            raise ValueError(
                f"{value!r} is not one email address: give it plainly, e.g. "
                "unsubscribe@shop.example"
            )
        return address

    @field_validator("secret_key_previous")
    @classmethod
    def _previous_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would verify whatever anyone signs with it.
        return value if value is not None and value.get_secret_value() else None

    @field_validator(
        "temporal_tls_cert",
        "temporal_tls_key",
        "temporal_tls_ca",
        "temporal_tls_server_name",
        mode="before",
    )
    @classmethod
    def _empty_tls_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("temporal_tls_key")
    @classmethod
    def _tls_cert_and_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # On the second of the two, so the error names a variable (the CLI shows it).
        cert = info.data.get("temporal_tls_cert") is not None
        if cert != (value is not None):
            missing = "KAERU_TEMPORAL_TLS_KEY" if cert else "KAERU_TEMPORAL_TLS_CERT"
            raise ValueError(
                "mTLS needs KAERU_TEMPORAL_TLS_CERT and KAERU_TEMPORAL_TLS_KEY together: "
                f"{missing} is missing (set it to the path of its PEM file, or unset both)"
            )
        return value

    @field_validator("dkim_private_key", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("dkim_private_key")
    @classmethod
    def _dkim_all_or_none(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # On the last of the three, so the error names a variable (the CLI shows it).
        given = {
            "KAERU_DKIM_SELECTOR": bool(str(info.data.get("dkim_selector", "")).strip()),
            "KAERU_DKIM_DOMAIN": bool(str(info.data.get("dkim_domain", "")).strip()),
            "KAERU_DKIM_PRIVATE_KEY": value is not None,
        }
        missing = [name for name, present in given.items() if not present]
        if missing and len(missing) < len(given):
            raise ValueError(
                "DKIM signing needs KAERU_DKIM_SELECTOR, KAERU_DKIM_DOMAIN and "
                f"KAERU_DKIM_PRIVATE_KEY together: {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (set "
                f"{'it' if len(missing) == 1 else 'them'}, or unset all three to send unsigned)"
            )
        return value

    @property
    def dkim_enabled(self) -> bool:
        """True when every message is DKIM-signed (all three DKIM settings are set)."""
        return self.dkim_private_key is not None

    # ---- consent: machine opens settings ----
    machine_opens_count: bool = Field(
        False,
        description="true: opens and clicks judged machine (Apple Mail Privacy Protection, link "
        "scanners) move journeys on like a person's; false: only human ones do (all are "
        "recorded either way)",
    )
    apple_ranges_url: str = Field(
        "https://mask-api.icloud.com/egress-ip-ranges.csv",
        description="where `kaeru opens refresh-ranges` downloads Apple's iCloud Private Relay "
        "egress ranges (CSV)",
    )
    apple_ranges_file: Path | None = Field(
        None,
        description="the Apple egress ranges file the API reads and `kaeru opens "
        "refresh-ranges` writes; unset: the starter list in the package "
        "(kaeru/data/apple_egress_ranges.csv)",
    )

    @property
    def resolved_apple_ranges_file(self) -> Path:
        """The Apple egress ranges file in use (the packaged starter list by default)."""
        from kaeru.machine_opens import PACKAGED_RANGES

        return self.apple_ranges_file or PACKAGED_RANGES

    # ---- consent: privacy (export, erase, codec) settings ----
    codec_master_key: SecretStr | None = Field(
        None,
        description="base64 of 32 random bytes: switches the payload codec on (AES-256-GCM, "
        "a data key per customer, crypto-shredded by `kaeru customers erase`); it wraps every "
        "data key. Unset: payloads go to Temporal in clear. Generate one with `python -c "
        "'import base64,os; print(base64.b64encode(os.urandom(32)).decode())'`",
    )
    codec_master_key_previous: SecretStr | None = Field(
        None,
        description="the former KAERU_CODEC_MASTER_KEY during a rotation: still unwraps data "
        "keys, never wraps; unset it after `kaeru codec rotate`",
    )
    codec_cors_origins: str = Field(
        "http://localhost:8233",
        description="comma-separated origins (the Temporal UI's) allowed to call the codec "
        "server at /codec/encode and /codec/decode from a browser",
    )

    @field_validator("codec_master_key", "codec_master_key_previous")
    @classmethod
    def _codec_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            raw = base64.b64decode(value.get_secret_value().strip(), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 32:
            raise ValueError(
                "must be base64 of exactly 32 bytes (AES-256): generate one with `python -c "
                "'import base64,os; print(base64.b64encode(os.urandom(32)).decode())'`"
            )
        return value

    # ---- consent: pseudonyms (P) settings ----
    pseudonymous_ids: Literal["auto", "always", "never"] = Field(
        "auto",
        description="what new journeys show of the customer id in Temporal's workflow ids, "
        "search attributes and memo (never encrypted): `auto` a keyed pseudonym (`p_` and 32 "
        "hex digits) of ids that look like an email address or a phone number, `always` of "
        "every id, `never` the id itself. Running journeys keep their ids and still get their "
        "events. Payloads still carry the id: only with the codec on (KAERU_CODEC_MASTER_KEY) "
        "does an erase leave it readable nowhere in Temporal. Moving to fewer pseudonyms "
        "(always → auto, or never) leaves journeys already running under one without new "
        "events",
    )

    # ---- analytics: touchpoints, online and offline (T) settings ----
    offline_channels: str = Field(
        "pos,store,call-centre",
        description="comma-separated store channels: a server-key event whose context.channel "
        "names one is an offline touch of that channel, and so is each row of `kaeru "
        "touchpoints import` (whose channel must be one of them)",
    )

    #: What a channel name may hold (``context.channel``, the import's ``channel`` column).
    CHANNEL_CHARACTERS: ClassVar[frozenset[str]] = frozenset(
        "abcdefghijklmnopqrstuvwxyz0123456789-_"
    )

    @staticmethod
    def is_channel_name(name: str) -> bool:
        """A channel name: lower-case letters, digits, ``-`` and ``_``, 1 to 50 of them."""
        return 0 < len(name) <= 50 and set(name) <= Settings.CHANNEL_CHARACTERS

    @field_validator("offline_channels")
    @classmethod
    def _offline_channels(cls, value: str) -> str:
        for name in (part.strip() for part in value.split(",")):
            if name and not cls.is_channel_name(name):
                raise ValueError(
                    f"{name!r} is not a channel name: lower-case letters, digits, - and _, "
                    "at most 50, e.g. pos,store,call-centre"
                )
        return value

    @property
    def offline_channel_set(self) -> frozenset[str]:
        """``offline_channels`` as a set (empty entries dropped)."""
        return frozenset(part.strip() for part in self.offline_channels.split(",") if part.strip())

    # ---- analytics: funnel, attribution, routes, KPIs (A) settings ----
    attribution_window: timedelta = Field(
        timedelta(days=5),
        description="a purchase this long (seconds or ISO 8601) or less after a person's open "
        "or click of a message (or its delivery, with KAERU_ATTRIBUTION_MODEL=delivery) is "
        "credited to that message and its journey (Klaviyo's default: 5 days)",
    )
    attribution_model: Literal["last-touch", "first-touch", "delivery"] = Field(
        "last-touch",
        description="which message a purchase is credited to: `last-touch` (the last open or "
        "click within the window), `first-touch` (the first one), or `delivery` (the last "
        "message delivered within the window, opened or not, as Braze counts)",
    )
    route_steps: int = Field(
        5, ge=1, description="route discovery keeps the first this many steps of each route"
    )
    route_top: int = Field(
        10,
        ge=1,
        description="route discovery shows this many routes per journey kind (and across "
        "journeys), the rest grouped as `other`",
    )

    # ---- analytics: experiments and holdouts (X) settings ----
    experiment_min_sample: int = Field(
        500,
        ge=2,
        description="recipients every arm of an experiment (or a holdout) needs before a "
        "verdict; below it the result says `collecting` (Klaviyo waits for 500)",
    )
    experiment_auto_promote: bool = Field(
        False,
        description="promote an experiment's winner once significant (p < 0.05 on "
        "conversion, every arm at KAERU_EXPERIMENT_MIN_SAMPLE): journeys that enter later "
        "give it to everyone; recorded with when and why",
    )
    experiment_promote_every: timedelta = Field(
        timedelta(days=1),
        description="how often the promotion rule looks for winners, over journeys entered "
        "in the last 90 days (a Temporal Schedule, there while KAERU_EXPERIMENT_AUTO_PROMOTE "
        "is true)",
    )

    # ---- analytics: dashboard and weekly report (D) settings ----
    temporal_ui_url: str = Field(
        "",
        description="base URL of the Temporal UI the dashboard links each journey to (e.g. "
        "https://cloud.temporal.io or http://temporal-ui:8080); empty: "
        "http://localhost:<KAERU_TEMPORAL_UI_PORT>, the dev server's",
    )
    report_to: str = Field(
        "",
        description="comma-separated operator addresses the weekly report is emailed to (not "
        "shoppers: no consent gate); empty: no report schedule",
    )
    report_every: timedelta = Field(
        timedelta(days=7),
        description="how often the report is built, emailed and stored, each covering the "
        "period just ended (seconds or ISO 8601)",
    )

    @field_validator("report_to")
    @classmethod
    def _report_addresses(cls, value: str) -> str:
        for address in (part.strip() for part in value.split(",")):
            local, _, domain = address.partition("@")
            odd = any(c in ' <>,;"' or ord(c) < 32 for c in address)
            if address and (not local or "." not in domain or "@" in domain or odd):
                raise ValueError(
                    f"{address!r} is not an email address: give plain addresses separated by "
                    "commas, e.g. ops@shop.example,owner@shop.example"
                )
        return value

    @property
    def report_recipients(self) -> list[str]:
        """``report_to`` as a list (empty entries dropped)."""
        return [part.strip() for part in self.report_to.split(",") if part.strip()]

    @property
    def resolved_temporal_ui_url(self) -> str:
        """The Temporal UI's base URL, without a trailing slash."""
        return (self.temporal_ui_url or f"http://localhost:{self.temporal_ui_port}").rstrip("/")

    # ---- connectors: Shopify in (S) settings ----
    shopify_webhook_secret: SecretStr | None = Field(
        None,
        description="the Shopify app's client secret (or the shop's webhook signing secret) "
        "that signs `POST /v1/webhooks/shopify`; several comma-separated during a rotation; "
        "unset: every Shopify webhook is refused (401)",
    )
    shopify_shop_domains: str = Field(
        "",
        description="the shops whose Shopify webhooks are read (`X-Shopify-Shop-Domain`, e.g. "
        "`tea-house.myshopify.com`), comma-separated; empty: any shop whose webhook the "
        "secret verifies (an app's client secret signs the webhooks of every shop it is "
        "installed on)",
    )
    shopify_customer_prefix: str = Field(
        "shopify-",
        max_length=50,
        description="the `userId` of a Shopify customer is this plus the customer's id "
        "(`shopify-207119551`); empty if your Segment events already use the bare Shopify "
        "customer id as `userId`",
    )

    # ---- connectors: recommendations for the shop's pages (R) settings ----
    recommendations_refresh: timedelta = Field(
        timedelta(hours=1),
        description="how often a Temporal Schedule recomputes the precomputed recommendations "
        "(bought together, best-sellers) from the orders; seconds or ISO 8601; `kaeru "
        "recommendations refresh` recomputes them at once",
    )
    recommendations_min_support: int = Field(
        2,
        ge=1,
        description="orders that must hold two products together before one is recommended "
        "with the other (fewer is chance, not a pattern)",
    )
    recommendations_min_confidence: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="share of the orders holding a product that must also hold the other "
        "before it is recommended with it (0 to 1; 0.1: one order in ten)",
    )
    read_key: SecretStr | None = Field(
        None,
        description="read-only key of `GET /v1/recommendations` (HTTP Basic user name, like "
        "the write key); neither write key opens it and it writes nothing; a page may carry "
        "it for `?product_id=`, but ask `?customer_id=` from the shop's server (its answer "
        "hints at what the customer bought); unset: the endpoint answers 503",
    )

    @field_validator("read_key")
    @classmethod
    def _read_key_is_not_a_write_key(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        """A read key equal to a write key would let whoever holds it write events."""
        if value is None or not value.get_secret_value():
            return value
        for name in ("write_key", "browser_write_key"):
            other = info.data.get(name)
            if other is not None and other.get_secret_value() == value.get_secret_value():
                raise ValueError(
                    f"KAERU_READ_KEY must differ from KAERU_{name.upper()}: give the read "
                    "key its own random value"
                )
        return value

    # ---- connectors: audiences out, batched; Google Customer Match (G) settings ----
    audience_flush_interval: timedelta = Field(
        timedelta(seconds=30),
        description="how often queued audience joins and leaves are sent to the ad platforms "
        "in batches (seconds or ISO 8601); a journey that adds a shopper waits for this flush",
    )
    meta_batch_size: int = Field(
        10_000,
        ge=1,
        le=10_000,
        description="members per Meta Graph API request when flushing audience changes (Meta "
        "takes at most 10,000)",
    )
    google_ads_api_url: str = Field(
        "https://googleads.googleapis.com/v26",
        description="Google Ads REST API base URL, with its version",
    )
    google_ads_developer_token: SecretStr | None = Field(
        None, description="Google Ads developer token (header `developer-token`)"
    )
    google_ads_access_token: SecretStr | None = Field(
        None,
        description="OAuth 2.0 access token for the Google Ads API (scope "
        "`https://www.googleapis.com/auth/adwords`); with the developer token, customer id "
        "and user list id, audiences also go to Google Customer Match",
    )
    google_ads_customer_id: str | None = Field(
        None, description="Google Ads customer id that owns the user list, digits only"
    )
    google_ads_login_customer_id: str | None = Field(
        None,
        description="manager account id sent as `login-customer-id` when the token's user "
        "reaches the customer through a manager account; digits only",
    )
    google_ads_user_list_id: str | None = Field(
        None, description="id of the Customer Match user list (CRM-based) audiences go to"
    )
    google_ads_batch_size: int = Field(
        10_000,
        ge=1,
        le=100_000,
        description="members per Google offline user data job (one addOperations request; "
        "Google takes at most 100,000 identifiers a request)",
    )

    # ---- stream C (identity, carts) settings ----

    # ---- stream D (dev stack, API) settings ----
    temporal_port: int = Field(
        7233,
        ge=1,
        le=65535,
        description="gRPC port of the Temporal dev server `kaeru dev` starts (a second stack "
        "beside the first needs its own); unset KAERU_TEMPORAL_ADDRESS follows it",
    )

    # ---- operations: the kill switch (stream H) settings ----
    kill_switch_cache: timedelta = Field(
        timedelta(seconds=5),
        description="how long a worker keeps what it read of the kill switches (seconds or "
        "ISO 8601): a switch turned on holds every journey's next outside step at most this "
        "long after",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _seconds_or_iso(cls, value: object, info: ValidationInfo) -> object:
        """Durations read as seconds too: pydantic alone takes only ISO 8601 or HH:MM:SS from a
        string, so ``KAERU_TRACKING_TTL=86400`` would be refused."""
        if (
            info.field_name is not None
            and cls.model_fields[info.field_name].annotation is timedelta
        ):
            return seconds_or_iso(value)
        return value

    @field_validator("*")
    @classmethod
    def _positive(cls, value: object, info: ValidationInfo) -> object:
        return positive_duration(value)

    @field_validator("image_origins")
    @classmethod
    def _image_origins(cls, value: str) -> str:
        for origin in (part.strip() for part in value.split(",")):
            parts = urlsplit(origin)
            if origin and (
                parts.scheme != "https"
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or "@" in parts.netloc
            ):
                raise ValueError(
                    f"{origin!r} is not an https origin: give scheme and host only, "
                    "e.g. https://cdn.shopify.com"
                )
        return value

    @property
    def image_origin_list(self) -> list[str]:
        """``image_origins`` as a list (empty entries dropped)."""
        return [part.strip() for part in self.image_origins.split(",") if part.strip()]

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the state directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'kaeru.db').resolve()}"

    @property
    def resolved_temporal_address(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, loaded once."""
    return Settings()
