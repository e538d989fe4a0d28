"""Every setting of kaeru, read from ``KAERU_*`` environment variables or ``.env``."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the embedded stack keeps its files (SQLite, Temporal history, caught mail).
STATE_DIR = Path(".kaeru")


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
    temporal_namespace: str = Field("default", description="Temporal namespace of every journey")
    task_queue: str = Field("kaeru", description="task queue the worker polls and journeys run on")
    temporal_ui_port: int = Field(8233, description="port of the dev server's web UI (`kaeru dev`)")
    max_concurrent_workflow_tasks: int = Field(
        50, ge=1, description="cap on workflow tasks a worker runs at once"
    )
    max_concurrent_activities: int = Field(
        100, ge=1, description="cap on activities a worker runs at once"
    )

    # Storage
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset: SQLite in .kaeru/")
    state_dir: Path = Field(
        STATE_DIR, description="where `kaeru dev` keeps SQLite, Temporal history and caught mail"
    )

    # API
    write_key: str | None = Field(None, description="Segment write key that ingestion requires")
    secret_key: SecretStr | None = Field(
        None, description="signs tracking links; unset: generated once and kept in the database"
    )
    public_url: str = Field("http://localhost:8000", description="base of tracking links")
    api_host: str = Field("127.0.0.1", description="address the API listens on")
    api_port: int = Field(8000, description="port the API listens on")
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

    @field_validator("max_start_event_age", mode="before")
    @classmethod
    def _seconds_or_iso(cls, value: object) -> object:
        # pydantic reads "604800" from the environment as HH:MM:SS and refuses it.
        if isinstance(value, str) and value.strip().isdigit():
            return timedelta(seconds=int(value))
        return value

    @field_validator("max_start_event_age")
    @classmethod
    def _positive_age(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be a positive duration, e.g. 604800 or P7D")
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

    # The cart-abandonment journey
    cart_email_delay: timedelta = Field(
        timedelta(days=1), description="how long the cart stays untouched before the cart email"
    )
    cart_open_wait: timedelta = Field(
        timedelta(days=1),
        description="how long the cart email may stay unopened before the journey ends",
    )
    cart_ad_delay: timedelta = Field(
        timedelta(days=1),
        description="after the open, wait before joining the retargeting audience",
    )
    cart_ad_click_wait: timedelta = Field(
        timedelta(days=3), description="how long to wait for an ad click before the journey ends"
    )
    cart_offer_delay: timedelta = Field(
        timedelta(days=1), description="after the ad click, wait before the coupon email"
    )
    cart_offer_wait: timedelta = Field(
        timedelta(days=3), description="how long to wait for a purchase after the coupon email"
    )
    cart_coupon_ttl: timedelta = Field(
        timedelta(days=7), description="how long a coupon stays valid"
    )
    cart_coupon_amount_minor: int = Field(1000, gt=0, description="coupon value in minor units")
    cart_coupon_currency: str = Field("USD", description="coupon currency (ISO 4217)")
    cart_recommendations: int = Field(
        3, ge=0, le=12, description="related products in the cart email (0 to 12)"
    )

    @field_validator(
        "cart_email_delay",
        "cart_open_wait",
        "cart_ad_delay",
        "cart_ad_click_wait",
        "cart_offer_delay",
        "cart_offer_wait",
        "cart_coupon_ttl",
    )
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be a positive duration, e.g. 86400 or P1D")
        return value

    @field_validator("cart_coupon_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if len(value) != 3 or not value.isalpha():
            raise ValueError("must be an ISO 4217 code such as USD or EUR")
        return value.upper()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the state directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'kaeru.db').resolve()}"

    @property
    def resolved_temporal_address(self) -> str:
        return self.temporal_address or "127.0.0.1:7233"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, loaded once."""
    return Settings()
