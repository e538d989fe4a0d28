"""``kaeru catalog import FILE``: the shop's catalogue (names, prices, images, availability) from
a CSV or JSON file, so products never seen in events can be shown, and unavailable ones never
are.

Columns (:data:`COLUMNS`): ``product_id`` and ``name`` required; ``price`` in major units
(``12.50``) with its ``currency`` (ISO 4217, e.g. ``EUR``); ``image_url`` and ``url`` as
``http(s)://`` links; ``available`` ``true``/``false`` (also ``yes``/``no``, ``1``/``0``;
default true). A CSV has a header naming its columns, in any order. A JSON file is an array
of objects, or one object per line (JSON Lines), with the same keys.

Every row is checked first and each problem names its line (a JSON array's: its item) and the
fix; one bad row imports nothing. Importing is an upsert by ``product_id``: the same file
twice changes nothing, and a column a file leaves out keeps its stored value. Names go
through the same cleaning as the events' (links removed): they reach other customers' emails.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from kaeru.commerce import MAX_ID_LENGTH, clean_product_name
from kaeru.models import Product, utcnow
from kaeru.money import to_minor

COLUMNS = ("product_id", "name", "price", "currency", "image_url", "url", "available")
REQUIRED = ("product_id", "name")
_YES = {"true", "yes", "1", "y"}
_NO = {"false", "no", "0", "n"}
#: The longest link stored (as ingestion caps them).
MAX_URL_LENGTH = 2000


@dataclass(frozen=True)
class Problem:
    """A bad row: where it is (``line 3``, ``item 2``) and what to fix."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class CatalogFileError(ValueError):
    """The file cannot be imported; ``problems`` say where and how to fix it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = list(problems)


def read_catalog(text: str, json_file: bool) -> list[dict[str, Any]]:
    """Every row of ``text`` (CSV, or JSON when ``json_file``), checked, as product columns.

    Raises:
        CatalogFileError: the file or any row is wrong (every problem found is listed).
    """
    rows = _json_rows(text) if json_file else _csv_rows(text)
    problems: list[Problem] = []
    products: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for where, raw in rows:
        values, found = _checked(raw)
        if not found and values["product_id"] in seen:
            found = [f"product_id {values['product_id']!r} is also on {seen[values['product_id']]}"]
            found[0] += ": keep one row per product"
        problems += [Problem(where, message) for message in found]
        if not found:
            seen[values["product_id"]] = where
            products.append(values)
    if problems:
        raise CatalogFileError(problems)
    if not products:
        raise CatalogFileError([Problem("line 1", f"no products in the file: {_fix()}")])
    return products


def _fix() -> str:
    return f"give the columns {', '.join(COLUMNS)} (product_id and name required)"


def _csv_rows(text: str) -> list[tuple[str, Mapping[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    header = [name.strip() for name in reader.fieldnames or []]
    unknown = [name for name in header if name not in COLUMNS]
    missing = [name for name in REQUIRED if name not in header]
    if not header or unknown or missing or len(set(header)) != len(header):
        said = (
            f"unknown column(s) {', '.join(map(repr, unknown))}"
            if unknown
            else f"missing column(s) {', '.join(missing)}"
            if missing
            else "a column named twice"
            if header
            else "the file is empty"
        )
        raise CatalogFileError([Problem("line 1", f"{said}: {_fix()}")])
    reader.fieldnames = header
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for row in reader:
        # line_num is the reader's line after the row: a quoted cell may span lines.
        rows.append((f"line {reader.line_num}", row))
    return rows


def _json_rows(text: str) -> list[tuple[str, Mapping[str, Any]]]:
    stripped = text.strip()
    try:
        if stripped.startswith("["):
            items = json.loads(stripped)
            named: Iterable[tuple[str, Any]] = (
                (f"item {n}", item) for n, item in enumerate(items, 1)
            )
        else:
            named = [
                (f"line {n}", json.loads(line))
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
    except json.JSONDecodeError as exc:
        raise CatalogFileError(
            [Problem(f"line {exc.lineno}", f"not JSON ({exc.msg}): fix the file's syntax")]
        ) from exc
    rows: list[tuple[str, Mapping[str, Any]]] = []
    problems: list[Problem] = []
    for where, item in named:
        if not isinstance(item, dict):
            problems.append(Problem(where, f"not an object: give an object with {_fix()}"))
            continue
        unknown = sorted(set(item) - set(COLUMNS))
        if unknown:
            problems.append(Problem(where, f"unknown key(s) {', '.join(unknown)}: {_fix()}"))
            continue
        nested = sorted(k for k, v in item.items() if isinstance(v, dict | list))
        if nested:
            problems.append(
                Problem(where, f"{', '.join(nested)}: give text, a number or true/false")
            )
            continue
        rows.append((where, item))
    if problems:
        raise CatalogFileError(problems)
    return rows


def _text(value: Any) -> str | None:
    """A cell as text; None when empty. Numbers are taken as written (JSON ids, prices)."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    text = str(value).strip()
    return text or None


def _checked(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    if raw.get("\0extra"):
        problems.append("more cells than the header has columns: quote cells holding commas")
    product_id = _text(raw.get("product_id"))
    if product_id is None or len(product_id) > MAX_ID_LENGTH:
        problems.append(f"product_id is required, 1 to {MAX_ID_LENGTH} characters")
    values: dict[str, Any] = {"product_id": product_id}
    name = clean_product_name(_text(raw.get("name")))
    if name is None:
        problems.append("name is required (links are removed from names): give the product's name")
    values["name"] = name
    price, currency = _text(raw.get("price")), _text(raw.get("currency"))
    if currency is not None and (len(currency) != 3 or not currency.isalpha()):
        problems.append(f"currency {currency!r} is not an ISO 4217 code: write e.g. EUR or USD")
    elif price is not None:
        if currency is None:
            problems.append("price needs its currency: fill the currency column, e.g. EUR")
        else:
            try:
                minor = to_minor(price, currency.upper())
            except ValueError:
                minor = -1
            if minor < 0:
                problems.append(f"price {price!r} is not an amount: write e.g. 12.50")
            else:
                values["price_minor"], values["currency"] = minor, currency.upper()
    elif currency is not None:
        values["currency"] = currency.upper()
    for field in ("image_url", "url"):
        link = _text(raw.get(field))
        if link is None:
            continue
        if not link.lower().startswith(("https://", "http://")) or len(link) > MAX_URL_LENGTH:
            problems.append(f"{field} must be an http(s):// link: write e.g. https://shop/p/1")
        else:
            values[field] = link
    available = raw.get("available")
    if isinstance(available, bool):
        values["available"] = available
    elif (said := _text(available)) is not None:
        if said.lower() in _YES | _NO:
            values["available"] = said.lower() in _YES
        else:
            problems.append(f"available {said!r} is not true or false: write true or false")
    return values, problems


def import_catalog(s: Session, products: Sequence[dict[str, Any]]) -> int:
    """Upsert ``products`` (from :func:`read_catalog`); the caller commits. Returns how many."""
    now = utcnow()
    dialect = s.get_bind().dialect.name
    for values in products:
        stated = tuple(sorted(values))
        s.execute(_upsert(dialect, stated), {"currency": "USD", **values, "updated_at": now})
    return len(products)


@lru_cache(maxsize=64)
def _upsert(dialect: str, stated: tuple[str, ...]) -> Any:
    """Insert a product, or update the ``stated`` columns of the stored one."""
    table = Product.__table__  # type: ignore[attr-defined]
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    return statement.on_conflict_do_update(
        index_elements=["product_id"],
        set_={
            key: statement.excluded[key] for key in (*stated, "updated_at") if key != "product_id"
        },
    )
