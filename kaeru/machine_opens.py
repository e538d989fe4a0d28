"""Machine opens: which fetches of a tracking pixel or link no person made.

Three rules, each with the reason it is recorded under:

* ``apple_mpp``: Apple Mail Privacy Protection fetches every remote image of a message when
  it reaches the device, through iCloud Private Relay's egress addresses, with the bare user
  agent ``Mozilla/5.0``. A fetch from those addresses with a full browser user agent (Safari
  of an iCloud+ subscriber, whose browsing goes through Private Relay too) is a person: MPP's
  proxy never sends one.
* ``scanner_ua``: the user agent names a link scanner or security gateway (Barracuda,
  Mimecast, Proofpoint, Microsoft's SafeLinks preview ``BingPreview`` and Office's link
  discovery). Gmail's ``GoogleImageProxy`` is NOT one: Gmail fetches the images through it
  when the shopper opens the message, so it is the shopper's open. Outlook's own
  ``Microsoft Office/16.0 (... Microsoft Outlook ...)`` is a person reading mail, too.
* ``all_links_same_second``: every link of a message (two or more) was first fetched within
  one second: a scanner following them all. Those clicks, and an open fetched in the same
  burst, are machine. A message with one link cannot be judged this way.

Nothing else makes a fetch machine: a browser or mail client stays human however soon after
delivery it comes. Classification is pure; the Apple ranges are read from a CSV file (the
packaged starter list, or Apple's own list written by ``kaeru opens refresh-ranges``), loaded
once per file version into sorted intervals that answer in O(log n).
"""

from __future__ import annotations

import os
import tempfile
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network
from pathlib import Path

APPLE_MPP = "apple_mpp"
SCANNER_UA = "scanner_ua"
ALL_LINKS_SAME_SECOND = "all_links_same_second"
REASONS = (APPLE_MPP, SCANNER_UA, ALL_LINKS_SAME_SECOND)

#: The starter list shipped in the package (see its header).
PACKAGED_RANGES = Path(__file__).parent / "data" / "apple_egress_ranges.csv"
#: The user agent of MPP's proxy fetch, exactly.
MPP_USER_AGENT = "Mozilla/5.0"
#: Substrings (lower case) of the user agents of link scanners and security gateways.
SCANNER_AGENTS = (
    "barracuda",
    "mimecast",
    "proofpoint",
    "bingpreview",
    "microsoft office existence discovery",
    "microsoft office protocol discovery",
)
#: How close together every link's first fetch must be for ``all_links_same_second``.
BURST = timedelta(seconds=1)


class RangeFileError(ValueError):
    """A ranges file that cannot be used; the message names the line and what is wrong."""


@dataclass(frozen=True)
class Ranges:
    """Address ranges as sorted, non-overlapping integer intervals per IP version."""

    starts: dict[int, list[int]]
    ends: dict[int, list[int]]
    networks: int

    @classmethod
    def of(cls, networks: Sequence[IPv4Network | IPv6Network]) -> Ranges:
        starts: dict[int, list[int]] = {4: [], 6: []}
        ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            same = [n for n in networks if n.version == version]
            for net in collapse_addresses(same):  # type: ignore[type-var]
                starts[version].append(int(net.network_address))
                ends[version].append(int(net.broadcast_address))
        return cls(starts, ends, len(networks))

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` lies in a range. A network (the rate limiter's IPv6 ``/64`` of a
        client, which one host holds whole) is in when any part of it is: Apple lists some
        egress prefixes longer than /64. Anything that is not an address is outside."""
        if not isinstance(address, str):
            return False
        try:
            net = ip_network(address.strip().strip("[]"), strict=False)
        except ValueError:
            return False
        if isinstance(net, IPv6Network) and net.network_address.ipv4_mapped is not None:
            net = ip_network(f"{net.network_address.ipv4_mapped}/32")
        first, last = int(net.network_address), int(net.broadcast_address)
        starts, ends = self.starts[net.version], self.ends[net.version]
        i = bisect_right(starts, last) - 1  # the last range starting at or before ``last``
        return i >= 0 and ends[i] >= first


def parse_ranges(text: str) -> Ranges:
    """Read Apple's ``egress-ip-ranges.csv`` format: ``prefix,country,region,city,`` lines.

    Blank lines and ``#`` comments are allowed.

    Raises:
        RangeFileError: a line whose first field is not an IPv4 or IPv6 prefix (the first
            such line is named), or a file with no prefix at all (an empty download, an HTML
            error page).
    """
    networks: list[IPv4Network | IPv6Network] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prefix = line.split(",", 1)[0].strip()
        try:
            networks.append(ip_network(prefix, strict=False))
        except ValueError:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise RangeFileError(
                f"line {number} is not 'prefix,country,region,city,' with an IP prefix: {shown!r}"
            ) from None
    if not networks:
        raise RangeFileError("it holds no address range (empty, or not Apple's CSV)")
    return Ranges.of(networks)


_loaded: dict[Path, tuple[tuple[int, int], Ranges]] = {}


def load_ranges(path: Path) -> Ranges:
    """The ranges of the file at ``path``, parsed once per version of the file (its size and
    modification time), so a refresh reaches running processes at their next lookup."""
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    ranges = parse_ranges(path.read_text(encoding="utf-8"))
    _loaded[path] = (version, ranges)
    return ranges


def write_ranges(text: str, path: Path) -> Ranges:
    """Check ``text`` as a ranges file and put it at ``path`` in one rename (a reader sees the
    old file or the new one, never half of one). A bad ``text`` leaves ``path`` as it was.

    Raises:
        RangeFileError: as :func:`parse_ranges`.
    """
    ranges = parse_ranges(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return ranges


def scanner_of(user_agent: str | None) -> bool:
    """Whether ``user_agent`` is a known link scanner's or security gateway's."""
    agent = (user_agent or "").lower()
    return any(name in agent for name in SCANNER_AGENTS)


def classify(address: str | None, user_agent: str | None, ranges: Ranges) -> str | None:
    """Why one fetch is a machine's (``apple_mpp`` or ``scanner_ua``), or None: a person's.

    Args:
        address: the client's address (or its IPv6 ``/64``), None if unknown.
        user_agent: the request's ``User-Agent``, None if it sent none.
        ranges: Apple's egress ranges (:func:`load_ranges`).
    """
    if scanner_of(user_agent):
        return SCANNER_UA
    if (user_agent or "").strip() == MPP_USER_AGENT and address is not None and address in ranges:
        return APPLE_MPP
    return None


def burst_of(first_hits: Sequence[datetime | None]) -> tuple[datetime, datetime] | None:
    """The first and last of the links' first fetches when every link (two or more) was
    fetched within :data:`BURST` of the first; None otherwise (a link never fetched)."""
    if len(first_hits) < 2 or any(at is None for at in first_hits):
        return None
    times = [at for at in first_hits if at is not None]
    first, last = min(times), max(times)
    return (first, last) if last - first < BURST else None


def in_burst(at: datetime | None, burst: tuple[datetime, datetime]) -> bool:
    """Whether a fetch at ``at`` (the open pixel's) belongs to the links' ``burst``."""
    return at is not None and burst[0] - BURST < at < burst[1] + BURST
