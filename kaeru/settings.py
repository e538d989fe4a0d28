"""Every setting of kaeru, read from ``KAERU_*`` environment variables or ``.env``."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
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
    temporal_namespace: str = "default"
    task_queue: str = "kaeru"
    temporal_ui_port: int = 8233
    max_concurrent_workflow_tasks: int = Field(
        50, ge=1, description="cap on workflow tasks a worker runs at once"
    )
    max_concurrent_activities: int = Field(100, ge=1)

    # Storage
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset: SQLite in .kaeru/")
    state_dir: Path = STATE_DIR

    # API
    write_key: str | None = Field(None, description="Segment write key that ingestion requires")
    secret_key: str | None = Field(
        None, description="signs tracking links; unset: generated once and kept in the database"
    )
    public_url: str = Field("http://localhost:8000", description="base of tracking links")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024

    # Email
    smtp_host: str | None = Field(None, description="unset: `kaeru dev` starts a mail catcher")
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_tls: bool = False
    smtp_timeout: float = 30.0
    mail_from: str = "Kaeru Shop <shop@kaeru.localhost>"
    mail_catcher_port: int = 8025

    # Shop
    shop_name: str = "Kaeru Shop"
    shop_url: str = "https://shop.example"
    cart_url: str = Field("https://shop.example/cart", description="link back to the cart")

    # Ads
    meta_graph_url: str = "https://graph.facebook.com/v21.0"
    meta_access_token: str | None = None
    meta_audience_id: str | None = None
    ad_campaign: str = Field(
        "kaeru-cart-retargeting",
        description="utm_campaign (context.campaign.name) that marks a retargeting-ad click",
    )

    # The cart-abandonment journey
    cart_email_delay: timedelta = timedelta(days=1)
    cart_open_wait: timedelta = timedelta(days=1)
    cart_ad_delay: timedelta = timedelta(days=1)
    cart_ad_click_wait: timedelta = timedelta(days=3)
    cart_offer_delay: timedelta = timedelta(days=1)
    cart_offer_wait: timedelta = timedelta(days=3)
    cart_coupon_ttl: timedelta = timedelta(days=7)
    cart_coupon_amount_minor: int = Field(1000, gt=0, description="coupon value in minor units")
    cart_coupon_currency: str = "USD"
    cart_recommendations: int = Field(3, ge=0, le=12)

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
        return self.temporal_address or "localhost:7233"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, loaded once."""
    return Settings()
