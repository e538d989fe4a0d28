"""Machine opens: Apple's egress ranges, scanner user agents, all links in one second."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.machine_opens import (
    ALL_LINKS_SAME_SECOND,
    APPLE_MPP,
    PACKAGED_RANGES,
    SCANNER_UA,
    RangeFileError,
    burst_of,
    classify,
    in_burst,
    load_ranges,
    parse_ranges,
    write_ranges,
)
from kaeru.settings import Settings

RANGES = parse_ranges(
    "172.224.226.0/27,GB,GB-EN,London,\n"
    "172.224.226.64/26,GB,GB-EN,London,\n"
    "2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,\n"
    "2a02:26f7:b000::/40,US,US-CA,Los Angeles,\n"
    "2a02:26f7:b3c5:7700:0:1::/80,GB,GB-EN,London,\n"
)
MPP = "Mozilla/5.0"
SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15"
)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)"
T0 = datetime(2026, 12, 2, 9, 0, 0, 900_000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("172.224.226.5", True),
        ("172.224.226.31", True),  # last address of the /27
        ("172.224.226.32", False),  # just past it, before the /26
        ("172.224.226.127", True),
        ("172.224.226.128", False),
        ("8.8.8.8", False),
        ("::ffff:172.224.226.5", True),  # an IPv4 client on a dual-stack socket
        ("2a02:26f7:b3c0:4000::1", True),
        ("2a02:26f7:b3c0:4001::1", False),
        ("2a02:26f7:b0ff:ffff::9", True),  # inside the /40
        ("2a02:26f7:b100::1", False),
        ("2001:db8::1", False),
        ("2a02:26f7:b3c0:4000::/64", True),  # the rate limiter's IPv6 bucket of a client
        ("2a02:26f7:b3c5:7700::/64", True),  # a bucket holding the /80 below
        ("2a02:26f7:b3c5:7701::/64", False),
        ("2a02:26f7:b3c5:7700:1:2::9", False),  # beside the /80 in its /64, as an address
        ("unknown", False),
        ("", False),
    ],
)
def test_an_address_inside_or_outside_the_ranges(address: str, inside: bool) -> None:
    assert (address in RANGES) is inside


def test_mpp_is_the_bare_user_agent_from_apples_ranges() -> None:
    assert classify("172.224.226.5", MPP, RANGES) == APPLE_MPP
    assert classify("2a02:26f7:b3c0:4000::1", " Mozilla/5.0 ", RANGES) == APPLE_MPP


def test_safari_through_private_relay_is_a_person() -> None:
    """Private Relay carries iCloud+ subscribers' own Safari browsing from the same ranges;
    MPP's proxy fetch never sends a full user agent, so Safari's is a person's."""
    assert classify("172.224.226.5", SAFARI, RANGES) is None


def test_the_bare_user_agent_outside_apples_ranges_is_not_mpp() -> None:
    assert classify("8.8.8.8", MPP, RANGES) is None
    assert classify(None, MPP, RANGES) is None


@pytest.mark.parametrize(
    "agent",
    [
        "Barracuda Sentinel (EE)",
        "Mozilla/5.0 (compatible; Mimecast URL Protect)",
        "Proofpoint URL Defense",
        "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/534+ (KHTML, like Gecko) BingPreview/1.0b",
        "Microsoft Office Existence Discovery",
        "Microsoft Office Protocol Discovery",
    ],
)
def test_link_scanners_are_machine_wherever_they_come_from(agent: str) -> None:
    assert classify("8.8.8.8", agent, RANGES) == SCANNER_UA
    assert classify("172.224.226.5", agent, RANGES) == SCANNER_UA


@pytest.mark.parametrize("agent", [CHROME, SAFARI, GMAIL, OUTLOOK, "", None])
def test_browsers_mail_clients_and_gmails_image_proxy_are_people(agent: str | None) -> None:
    """GoogleImageProxy fetches on the shopper's open; Outlook is the shopper reading."""
    assert classify("8.8.8.8", agent, RANGES) is None


def test_every_link_within_one_second_is_a_burst() -> None:
    hits = [T0, T0 + timedelta(milliseconds=300), T0 + timedelta(milliseconds=999)]
    assert burst_of(hits) == (T0, T0 + timedelta(milliseconds=999))
    # Across a change of the clock's second, still within one second: a burst.
    assert burst_of([T0, T0 + timedelta(milliseconds=200)]) is not None


@pytest.mark.parametrize(
    "hits",
    [
        [T0, T0 + timedelta(seconds=1)],  # a full second apart
        [T0, None],  # a link never fetched
        [T0],  # one link: no way to tell
        [],
    ],
)
def test_no_burst(hits: list[datetime | None]) -> None:
    assert burst_of(hits) is None


def test_an_open_belongs_to_the_burst_only_when_it_comes_with_it() -> None:
    burst = (T0, T0 + timedelta(milliseconds=500))
    assert in_burst(T0 - timedelta(milliseconds=400), burst)
    assert in_burst(T0 + timedelta(milliseconds=1200), burst)
    assert not in_burst(T0 - timedelta(minutes=10), burst)  # the shopper opened earlier
    assert not in_burst(None, burst)


def test_the_packaged_starter_list_parses_and_holds_apples_own_block() -> None:
    ranges = load_ranges(PACKAGED_RANGES)
    assert "17.253.1.1" in ranges
    assert "2620:149:a:1::1" in ranges
    assert "8.8.8.8" not in ranges
    assert "refresh-ranges" in PACKAGED_RANGES.read_text()


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("", "no address range"),
        ("# only a comment\n\n", "no address range"),
        ("<html><body>Service Unavailable</body></html>\n", "line 1"),
        ("17.0.0.0/8,US,,,\n300.1.2.0/24,US,,,\n", "line 2"),
        ("17.0.0.0/8,US,,,\nLondon,GB,,,\n", "'London,GB,,,'"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(text: str, phrase: str) -> None:
    with pytest.raises(RangeFileError, match=phrase):
        parse_ranges(text)


def test_writing_a_bad_file_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "ranges.csv"
    write_ranges("172.224.226.0/27,GB,GB-EN,London,\n", path)
    with pytest.raises(RangeFileError):
        write_ranges("172.224.226.0/27,GB,GB-EN,London,\nnot a prefix,,,,\n", path)
    assert path.read_text() == "172.224.226.0/27,GB,GB-EN,London,\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ranges.csv"]  # no temp file left


def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "ranges.csv"
    write_ranges("172.224.226.0/27,GB,GB-EN,London,\n", path)
    assert "172.224.226.5" in load_ranges(path)
    assert load_ranges(path) is load_ranges(path)  # parsed once per version
    write_ranges("104.28.0.0/24,US,,,\n", path)
    os.utime(path, ns=(1, 1))  # a different version even within the clock's resolution
    assert "172.224.226.5" not in load_ranges(path)
    assert "104.28.0.9" in load_ranges(path)


def test_a_large_list_answers_by_bisection() -> None:
    """Apple's list has hundreds of thousands of prefixes: lookups stay logarithmic."""
    text = "".join(f"10.{i // 256}.{i % 256}.0/28,US,,,\n" for i in range(60_000))
    ranges = parse_ranges(text)
    assert ranges.networks == 60_000
    assert len(ranges.starts[4]) == 60_000  # /28s at /24 steps do not merge
    assert "10.100.7.3" in ranges
    assert "10.100.7.16" not in ranges


def test_reasons_are_named_as_recorded() -> None:
    assert (APPLE_MPP, SCANNER_UA, ALL_LINKS_SAME_SECOND) == (
        "apple_mpp",
        "scanner_ua",
        "all_links_same_second",
    )


# ---- kaeru opens refresh-ranges ------------------------------------------------------------

GOOD = "172.224.226.0/27,GB,GB-EN,London,\n2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,\n"
OLD = "104.28.0.0/24,US,,,\n"


class _Files(BaseHTTPRequestHandler):
    """Serves ``routes`` (path → (status, body)) on loopback, as Apple's address would."""

    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def apple() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Files.routes = {
        "/egress-ip-ranges.csv": (200, GOOD.encode()),
        "/error.csv": (200, b"<html><body>Service Unavailable</body></html>"),
        "/down.csv": (503, b"busy"),
    }
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ranges file the API would read (KAERU_APPLE_RANGES_FILE), holding an old list."""
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ranges" / "apple.csv"
    path.parent.mkdir()
    path.write_text(OLD)
    monkeypatch.setenv("KAERU_APPLE_RANGES_FILE", str(path))
    return path


def refresh(*args: str, **env: str) -> Result:
    return CliRunner().invoke(app, ["opens", "refresh-ranges", *args], env=env)


def test_refresh_downloads_the_setting_url_and_the_api_reads_it(apple: str, target: Path) -> None:
    result = refresh(KAERU_APPLE_RANGES_URL=f"{apple}/egress-ip-ranges.csv")

    assert result.exit_code == 0, result.output
    assert f"Wrote 2 ranges from {apple}/egress-ip-ranges.csv to {target}" in result.output
    assert target.read_text() == GOOD
    assert "172.224.226.5" in load_ranges(Settings().resolved_apple_ranges_file)


def test_refresh_from_a_url_or_a_local_file(apple: str, target: Path, tmp_path: Path) -> None:
    assert refresh("--url", f"{apple}/egress-ip-ranges.csv").exit_code == 0
    assert target.read_text() == GOOD
    local = tmp_path / "copy.csv"
    local.write_text(OLD + GOOD)
    result = refresh("--file", str(local))
    assert result.exit_code == 0, result.output
    assert target.read_text() == OLD + GOOD


@pytest.mark.parametrize(
    ("path", "phrases"),
    [
        ("/error.csv", ["is not a list of address ranges", "line 1", "the old list is kept"]),
        ("/down.csv", ["cannot download", "503", "the old list is kept", "--file PATH"]),
        ("/missing.csv", ["cannot download", "404"]),
    ],
)
def test_a_bad_download_is_refused_and_the_old_list_kept(
    apple: str, target: Path, path: str, phrases: list[str]
) -> None:
    result = refresh("--url", f"{apple}{path}")

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.stderr
    assert target.read_text() == OLD
    assert [p.name for p in target.parent.iterdir()] == ["apple.csv"]


def test_a_bad_local_file_is_refused_and_the_old_list_kept(target: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(GOOD + "17.0.0.0/33,US,,,\n")
    result = refresh("--file", str(bad))
    assert result.exit_code == 1
    assert "line 3" in result.stderr and "the old list is kept" in result.stderr
    assert target.read_text() == OLD

    result = refresh("--file", str(tmp_path / "nowhere.csv"))
    assert result.exit_code == 1 and "cannot read" in result.stderr
    assert target.read_text() == OLD


def test_the_default_file_is_the_packaged_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAERU_APPLE_RANGES_FILE", raising=False)
    assert Settings().resolved_apple_ranges_file == PACKAGED_RANGES
    assert Settings().apple_ranges_url == "https://mask-api.icloud.com/egress-ip-ranges.csv"
