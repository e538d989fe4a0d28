"""Where a message's links and images may point: the shop's exact origins (and a CDN's)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from kaeru.settings import Settings

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def web_url(url: str | None) -> str | None:
    """``url`` if it is an http(s) URL; product data comes from events, so never trust it."""
    if url and re.match(r"^https?://[^\s\"'<>\\\x00-\x1f\x7f]+$", url, re.IGNORECASE):
        return url
    return None


def host_of(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:  # "http://[::1" and the like
        return None
    return host.rstrip(".").lower() if host else None


#: An origin: scheme, host (lower case), port (the scheme's default made explicit).
_Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A host name as kaeru compares it: ASCII letters, digits, hyphens and inner dots only, so
# nothing a browser would decode or map (percent-escapes, IDN look-alikes, a trailing dot).
_HOST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$|^\[[0-9a-f:.]+\]$")


def _origin_of(url: str | None) -> _Origin | None:
    """The origin of an absolute http(s) URL without userinfo, or None for anything else."""
    url = web_url(url)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port or bracket
        return None
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower()
    host = netloc.rsplit(":", 1)[0] if port is not None else netloc
    if "@" in netloc or not _HOST_NAME.match(host):
        return None
    return scheme, host.strip("[]"), port if port is not None else _DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class Hosts:
    """Where a message's links and images may point.

    Links and images: only the exact origins (scheme, host and port) of ``KAERU_SHOP_URL`` and
    ``KAERU_CART_URL``, so with the default ``https://`` URLs only https on the standard port;
    no subdomain (``www.shop.example`` may be someone else's), no other port, no userinfo, no
    host a browser would read differently. Kaeru's own click redirect must never take a
    shopper elsewhere (phishing), so other product links fall back to the cart's (or the
    shop's) page, and an image from elsewhere is dropped, the product shown by name. One
    exception, for ``kaeru dev`` and its demo: when ``KAERU_PUBLIC_URL`` is itself on loopback,
    kaeru runs on a developer's machine and images on loopback (``localhost``, ``127.0.0.1``,
    ``::1``, any port: the mail catcher serves the demo's pictures) are kept too. A real
    deployment has a public ``KAERU_PUBLIC_URL``, so there a loopback image is dropped like any
    other foreign one.
    """

    origins: frozenset[_Origin]
    loopback_images: bool
    #: ``KAERU_IMAGE_ORIGINS``: where else product images may come from (a shop's CDN).
    image_origins: frozenset[_Origin] = frozenset()

    @classmethod
    def of(cls, settings: Settings) -> Hosts:
        origins = frozenset(o for o in map(_origin_of, (settings.shop_url, settings.cart_url)) if o)
        images = frozenset(o for o in map(_origin_of, settings.image_origin_list) if o)
        return cls(origins, host_of(settings.public_url) in LOOPBACK, images)

    def link(self, url: str | None) -> str | None:
        return url if _origin_of(url) in self.origins else None

    def image(self, url: str | None) -> str | None:
        origin = _origin_of(url)
        if (
            origin in self.origins
            or origin in self.image_origins
            or (self.loopback_images and origin is not None and origin[1] in LOOPBACK)
        ):
            return url
        return None
