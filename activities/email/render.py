"""Rendering: a template family plus a context becomes a subject, a text and an HTML part.

A family is three files in ``activities/templates``: ``<family>.subject.j2``, ``.txt.j2``
and ``.html.j2`` (HTML autoescaped). The journey's ``SendEmailInput.context`` (its typed
context dataclass, as a dict) arrives as top-level template variables, beside what every
email has (:data:`RESERVED`): ``shop``, the helpers below, and the legacy cart variables
(``cart``, ``cart_url``, ``cart_total``, ``related``, ``coupon``) that the cart templates
read. Helpers make untrusted product data (from shop events) safe to show:

- ``track(url)``: the click-tracking link to an http(s) ``url`` (an error for anything else);
- ``link(url)``: the tracking link to ``url`` if it is on the shop's origins, else to the shop;
- ``image(url)``: ``url`` if it is on an allowed image origin, else None (show no image);
- ``money(amount_minor, currency)`` (also a filter: ``amount|money("USD")``): ``19.99 USD``;
- ``products_of(items)``: product dicts (or bare product ids) as display dicts (``id``,
  ``name``, ``price``, ``image``, ``url``, ``quantity``, ``total``), named, linked and pictured
  from the catalogue when the shop knows the product;
- ``lines_of(items, total_minor=None, currency=None)``: the same, plus ``.total`` (the given
  total, or the sum when every line has a price in one currency);
- ``coupon_of(coupon)``: a coupon dict (``code``, ``amount_minor``, ``currency``,
  ``expires_at``) as ``code``, ``value`` and ``expires``.

The open pixel is appended to every HTML part after rendering. Every marketing message also
gets the footer (``_footer.txt.j2`` and ``_footer.html.j2``, appended to its two parts): the
unsubscribe link and the shop's postal address (``KAERU_SHOP_ADDRESS``), which the law asks of
every marketing email, so no family can forget them. Every family may show them elsewhere
too: ``unsubscribe_url`` (None in a transactional message) and ``shop_address`` (None when
unset).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import escape
from sqlmodel import Session, col, select
from temporalio.exceptions import ApplicationError

from activities.email.addresses import scrub
from activities.email.links import Hosts, web_url
from activities.types import CouponInfo, ProductInfo, SendEmailInput
from kaeru.models import Product
from kaeru.money import format_minor, to_minor
from kaeru.settings import Settings
from kaeru.tracking_tokens import click_url, open_url
from kaeru.unsubscribe_tokens import unsubscribe_url

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"

#: ApplicationError type of a family that cannot render (retried: a deploy fixes it).
TEMPLATE_FAILED = "TemplateFailed"
#: ApplicationError type of a family that does not exist (not retried: the journey is wrong).
TEMPLATE_MISSING = "TemplateMissing"

#: The longest subject kaeru sends (the message log column holds 500; clients show ~60).
MAX_SUBJECT = 200
#: The longest product name or header value kaeru puts in a message.
MAX_TEXT = 200
#: Template variables every message has; a journey's context may not reuse these names.
RESERVED = frozenset(
    {
        "shop",
        "track",
        "link",
        "image",
        "money",
        "products_of",
        "lines_of",
        "coupon_of",
        "unsubscribe_url",
        "shop_address",
        "variant",
    }
)
#: The partials appended to every marketing message (each part): its unsubscribe link.
FOOTERS = {"txt": "_footer.txt.j2", "html": "_footer.html.j2"}

_FAMILY = re.compile(r"^[a-z0-9_]+$")
_PARTS = ("subject", "txt", "html")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str
    links: list[str]
    #: The message's unsubscribe link (``/u/<token>``); None for a transactional message.
    unsubscribe_url: str | None = None


@dataclass(frozen=True)
class Lines:
    """Cart or order lines for the ``_lines`` partials: ``rows`` and the formatted ``total``."""

    rows: list[dict[str, Any]]
    total: str | None


@dataclass
class Catalogue:
    """Products the shop itself described (trusted sources only), looked up once per id."""

    session: Session
    known: dict[str, Product | None] = field(default_factory=dict)

    def get(self, ids: Iterable[str]) -> dict[str, Product]:
        ids = list(ids)
        wanted = sorted({i for i in ids if i not in self.known})
        if wanted:
            found = {
                p.product_id: p
                for p in self.session.exec(
                    select(Product).where(col(Product.product_id).in_(wanted))
                )
            }
            for product_id in wanted:
                self.known[product_id] = found.get(product_id)
        return {i: p for i in ids if (p := self.known.get(i)) is not None}


def encodable(text: str) -> str:
    """``text`` without lone surrogates (JSON can carry them), which no encoder accepts."""
    return text.encode("utf-8", "replace").decode("utf-8")


def clean(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: control characters and line breaks become
    spaces, runs of space one, and a longer text ends in an ellipsis. Safe in a header."""
    chars = (
        " " if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c
        for c in encodable(str(text))
    )
    line = " ".join("".join(chars).split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _money(amount_minor: int | None, currency: str) -> str | None:
    return format_minor(amount_minor, clean(currency, 8)) if amount_minor is not None else None


def _product_context(product: ProductInfo, fallback_url: str, hosts: Hosts) -> dict[str, Any]:
    # A product without a name shows no name, never its id (ids are not for shoppers).
    return {
        "id": product.product_id,
        "name": clean(product.name, MAX_TEXT),
        "price": _money(product.price_minor, product.currency),
        "image": hosts.image(product.image_url),
        "url": hosts.link(product.url) or fallback_url,
    }


def _trusted(product: ProductInfo, known: Product | None) -> ProductInfo:
    """``product`` with its name, link and image from the catalogue when the shop knows it.

    Product data in events comes from browsers too (a public key can send them for any
    customer id); the catalogue is written by trusted sources only. The event's price stays
    (the one the shopper saw), unless it had none.
    """
    if known is None:
        return product
    priced = product.price_minor is not None
    return replace(
        product,
        name=known.name,
        url=known.url,
        image_url=known.image_url,
        price_minor=product.price_minor if priced else known.price_minor,
        currency=product.currency if priced else known.currency,
    )


def with_catalogue(catalogue: Catalogue, email: SendEmailInput) -> SendEmailInput:
    """``email`` with each legacy cart product named, linked and pictured by the catalogue."""
    if not email.cart:
        return email
    known = catalogue.get(line.product.product_id for line in email.cart)
    cart = [
        replace(line, product=_trusted(line.product, known.get(line.product.product_id)))
        for line in email.cart
    ]
    return replace(email, cart=cart)


def _cart_context(email: SendEmailInput, cart_url: str, hosts: Hosts) -> list[dict[str, Any]]:
    lines = []
    for line in email.cart:
        product = line.product
        total = None if product.price_minor is None else product.price_minor * line.quantity
        lines.append(
            {
                **_product_context(product, cart_url, hosts),
                "quantity": line.quantity,
                "total": _money(total, product.currency),
            }
        )
    return lines


def _total(rows: list[tuple[int | None, int, str]]) -> str | None:
    """The sum of ``(price_minor, quantity, currency)`` rows, if all are priced in one currency."""
    currencies = {currency for _, _, currency in rows}
    if not rows or len(currencies) != 1 or any(price is None for price, _, _ in rows):
        return None
    return _money(sum((price or 0) * quantity for price, quantity, _ in rows), currencies.pop())


def _cart_total(email: SendEmailInput) -> str | None:
    """The cart's total, if every line has a price in one currency."""
    return _total(
        [(line.product.price_minor, line.quantity, line.product.currency) for line in email.cart]
    )


def _coupon_context(coupon: CouponInfo) -> dict[str, Any]:
    return {
        "code": coupon.code,
        "value": format_minor(coupon.amount_minor, coupon.currency),
        "expires": f"{coupon.expires_at:%d %B %Y}",
    }


def _with_pixel(html: str, pixel_url: str) -> str:
    """Append the open-tracking pixel at the end of the body, whatever the template did."""
    tag = (
        f'<img src="{escape(pixel_url)}" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px;">'
    )
    at = html.lower().rfind("</body>")
    return html + tag if at < 0 else html[:at] + tag + html[at:]


def _with_footer(body: str, footer: str, html: bool) -> str:
    """``footer`` at the end of a text part, or of an HTML part's body."""
    at = body.lower().rfind("</body>") if html else -1
    if at < 0:
        return body.rstrip("\n") + "\n\n" + footer
    return body[:at] + footer + body[at:]


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _quantity(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _as_product(item: object) -> tuple[ProductInfo, int]:
    """A product dict of a journey's context (or a bare id) as a product and its quantity.

    Prices come as ``price_minor`` (minor units) or ``price`` (a decimal amount, as shops
    send them in events); anything unreadable counts as no price.
    """
    if isinstance(item, str):
        return ProductInfo(item, ""), 1
    if not isinstance(item, Mapping):
        raise ValueError(f"a product must be a dict or a product id, not {type(item).__name__}")
    product = item.get("product", item)  # a CartLine-shaped {"product": ..., "quantity": n}
    if not isinstance(product, Mapping):
        raise ValueError("a line's product must be a dict")
    product_id = _text(product.get("product_id") or product.get("id"))
    if not product_id:
        raise ValueError("a product needs a product_id")
    currency = _text(product.get("currency")).upper() or "USD"
    price_minor = product.get("price_minor")
    if not isinstance(price_minor, int) or isinstance(price_minor, bool):
        price_minor = None
        price = product.get("price")
        if isinstance(price, int | float | str | Decimal) and not isinstance(price, bool):
            try:
                price_minor = to_minor(price, currency)
            except ValueError:
                price_minor = None
    info = ProductInfo(
        product_id=product_id,
        name=_text(product.get("name")),
        price_minor=price_minor,
        currency=currency,
        image_url=_text(product.get("image_url")) or None,
        url=_text(product.get("url")) or None,
    )
    return info, _quantity(item.get("quantity", product.get("quantity")))


def _expiry(value: object) -> str:
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        when = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        when = datetime.fromisoformat(value)
    else:
        raise ValueError("a coupon's expires_at must be a date and time")
    return f"{when:%d %B %Y}"


class Renderer:
    """Renders template families for one worker's settings."""

    def __init__(self, settings: Settings, folders: Sequence[Path] = (TEMPLATES,)) -> None:
        self.settings = settings
        #: Where families are looked up, first match wins (kaeru's own folder by default).
        self.folders = tuple(folders)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.folders),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["money"] = lambda amount, currency="USD": (
            _money(amount, currency) or ""
        )

    def check_family(self, family: str) -> None:
        """Refuse (not retryable) a family name that is not plain, or whose files are missing."""
        if not _FAMILY.match(family):
            raise ApplicationError(
                f"template family {family!r} is not a plain name (a-z, 0-9, _); "
                "fix the journey that asked for it",
                type=TEMPLATE_FAILED,
                non_retryable=True,
            )
        missing = [
            f"{family}.{part}.j2"
            for part in _PARTS
            if not any((folder / f"{family}.{part}.j2").is_file() for folder in self.folders)
        ]
        if missing:
            where = ", ".join(str(folder) for folder in self.folders)
            raise ApplicationError(
                f"template family {family!r} does not exist: {', '.join(missing)} not found in "
                f"{where}. Add the files (a family is <name>.subject.j2, .txt.j2 and "
                ".html.j2) or fix the template name in the journey",
                type=TEMPLATE_MISSING,
                non_retryable=True,
            )

    def render(self, email: SendEmailInput, link_key: bytes, catalogue: Catalogue) -> Rendered:
        """Render ``email``'s family with its context; its links registered in order of use."""
        s = self.settings
        family = email.template
        self.check_family(family)
        clashes = sorted(RESERVED & set(email.context))
        if clashes:
            raise ApplicationError(
                f"the context of the {family} email uses reserved names {clashes}: every "
                f"message already has {sorted(RESERVED)}; rename those fields of the journey's "
                "context",
                type=TEMPLATE_FAILED,
                non_retryable=True,
            )
        email = with_catalogue(catalogue, email)
        links: list[str] = []
        hosts = Hosts.of(s)

        def track(url: str) -> str:
            """The click-tracking link to ``url``, registering it in the message's links."""
            if web_url(url) is None:
                raise ValueError(f"only http(s) links can be tracked, not {url!r}")
            if url not in links:
                links.append(url)
            return click_url(s.public_url, link_key, email.key, links.index(url))

        def products_of(items: Iterable[object] | None) -> list[dict[str, Any]]:
            parsed = [_as_product(item) for item in items or ()]
            known = catalogue.get(p.product_id for p, _ in parsed)
            shown = []
            for product, quantity in parsed:
                product = _trusted(product, known.get(product.product_id))
                total = None if product.price_minor is None else product.price_minor * quantity
                shown.append(
                    {
                        **_product_context(product, s.shop_url, hosts),
                        "quantity": quantity,
                        "total": _money(total, product.currency),
                        "price_minor": product.price_minor,
                        "currency": product.currency,
                    }
                )
            return shown

        def lines_of(
            items: Iterable[object] | None,
            total_minor: int | None = None,
            currency: str | None = None,
        ) -> Lines:
            rows = products_of(items)
            if total_minor is not None:
                total = _money(total_minor, currency or "USD")
            else:
                total = _total([(r["price_minor"], r["quantity"], r["currency"]) for r in rows])
            return Lines(rows, total)

        def coupon_of(coupon: Mapping[str, Any]) -> dict[str, Any]:
            return {
                "code": _text(coupon.get("code")),
                "value": format_minor(int(coupon["amount_minor"]), _text(coupon.get("currency"))),
                "expires": _expiry(coupon.get("expires_at")),
            }

        def money(amount_minor: int | None, currency: str = "USD") -> str:
            return _money(amount_minor, currency) or ""

        cart_url = hosts.link(email.cart_url) or s.cart_url
        unsubscribe = (
            unsubscribe_url(s.public_url, link_key, email.key) if email.marketing else None
        )
        context: dict[str, Any] = {
            "cart_url": cart_url,
            "cart": _cart_context(email, cart_url, hosts),
            "cart_total": _cart_total(email),
            "related": [_product_context(p, s.shop_url, hosts) for p in email.recommendations],
            "coupon": _coupon_context(email.coupon) if email.coupon else None,
            **email.context,
            "shop": {"name": s.shop_name, "url": s.shop_url},
            # The experiment arm (kaeru/variants.py): a template may word itself by it.
            "variant": email.variant,
            "track": track,
            "link": lambda url: track(hosts.link(url) or s.shop_url),
            "image": hosts.image,
            "money": money,
            "products_of": products_of,
            "lines_of": lines_of,
            "coupon_of": coupon_of,
            "unsubscribe_url": unsubscribe,
            "shop_address": s.shop_address.strip() or None,
        }
        try:
            rendered = [
                self.templates.get_template(f"{family}.{part}.j2").render(context)
                for part in _PARTS
            ]
            if unsubscribe is not None:
                for index, part in ((1, "txt"), (2, "html")):
                    footer = self._footer(part, context, unsubscribe)
                    rendered[index] = _with_footer(rendered[index], footer, part == "html")
        except (jinja2.TemplateError, ValueError, KeyError, TypeError) as exc:
            # A deploy fixes a broken template; retrying until then keeps the journey alive.
            raise ApplicationError(
                f"cannot render the {family} email: {scrub(str(exc))}. Fix "
                f"{family}.{{subject,html,txt}}.j2 in {self.folders[0]} (or the journey's "
                "context) and deploy; the send is retried meanwhile",
                type=TEMPLATE_FAILED,
            ) from exc
        subject, text, html = rendered
        pixel = open_url(s.public_url, link_key, email.key)
        return Rendered(
            clean(subject, MAX_SUBJECT),
            encodable(text),
            encodable(_with_pixel(html, pixel)),
            links,
            unsubscribe,
        )

    def _footer(self, part: str, context: dict[str, Any], unsubscribe: str) -> str:
        """The rendered footer partial of ``part``; one that lost the link is a broken template
        (a shop's own ``_footer`` partial must keep it: the law asks for it)."""
        footer = self.templates.get_template(FOOTERS[part]).render(context)
        shown = unsubscribe if part == "txt" else str(escape(unsubscribe))
        if shown not in footer:
            raise jinja2.TemplateError(
                f"{FOOTERS[part]} does not show unsubscribe_url: every marketing email must "
                "carry its unsubscribe link"
            )
        return footer
