"""``kaeru catalog import FILE`` and ``kaeru recommendations refresh``: a CSV or JSON catalogue
upserted, a bad file imported not at all with each problem's line and fix, and unavailable
products never recommended; through typer's runner, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from sqlmodel import col, select
from typer.testing import CliRunner, Result

from kaeru import recommendations
from kaeru.cli import app as cli
from kaeru.db import session
from kaeru.models import Product
from tests.activities.factories import add_order

runner = CliRunner()
HEADER = "product_id,name,price,currency,image_url,url,available"


def kaeru(url: str, *args: str) -> Result:
    return runner.invoke(cli, list(args), env={"KAERU_DATABASE_URL": url})


def written(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def catalogue(url: str) -> dict[str, tuple[str, int | None, str, str | None, bool]]:
    with session(url) as s:
        rows = s.exec(select(Product).order_by(col(Product.product_id)))
        return {p.product_id: (p.name, p.price_minor, p.currency, p.url, p.available) for p in rows}


def test_a_csv_then_a_json_catalogue_is_upserted_and_imports_twice_the_same(
    database_url: str, tmp_path: Path
) -> None:
    csv_file = written(
        tmp_path,
        "catalog.csv",
        HEADER,
        "sencha,Sencha Fukamushi,12.50,EUR,https://cdn.tea.example/s.jpg,https://tea.example/s,true",
        '"kettle","Kettle, cast iron",89,EUR,,,no',
        "yen-tin,Tin,500,JPY,,,",
    )
    for _ in range(2):
        done = kaeru(database_url, "catalog", "import", str(csv_file))
        assert done.exit_code == 0, done.output
    assert "3 product(s), 1 of them unavailable" in done.output
    assert catalogue(database_url) == {
        "kettle": ("Kettle, cast iron", 8900, "EUR", None, False),
        "sencha": ("Sencha Fukamushi", 1250, "EUR", "https://tea.example/s", True),
        "yen-tin": ("Tin", 500, "JPY", None, True),
    }

    later = [
        {"product_id": "kettle", "name": "Kettle", "available": True},
        {"product_id": 7, "name": "Whisk", "price": 9.5, "currency": "eur"},
    ]
    json_file = tmp_path / "catalog.json"
    json_file.write_text(json.dumps(later), encoding="utf-8")
    done = kaeru(database_url, "catalog", "import", str(json_file))
    assert done.exit_code == 0, done.output
    lines = tmp_path / "catalog.jsonl"
    lines.write_text(json.dumps({"product_id": "sencha", "name": "Sencha"}) + "\n")
    assert kaeru(database_url, "catalog", "import", str(lines)).exit_code == 0
    # Columns a file leaves out keep their stored values (the kettle's price, sencha's link).
    assert catalogue(database_url) == {
        "7": ("Whisk", 950, "EUR", None, True),
        "kettle": ("Kettle", 8900, "EUR", None, True),
        "sencha": ("Sencha", 1250, "EUR", "https://tea.example/s", True),
        "yen-tin": ("Tin", 500, "JPY", None, True),
    }


def test_a_bad_file_names_each_line_and_its_fix_and_imports_nothing(
    database_url: str, tmp_path: Path
) -> None:
    bad = written(
        tmp_path,
        "catalog.csv",
        HEADER,
        "ok,Fine,1,EUR,,,",
        ",No id,1,EUR,,,",
        "p2,,1,EUR,,,",
        "p3,Priced,12.5,,,,",
        "p4,Odd,twelve,EUR,,,",
        "p5,Linked,1,EUR,javascript:alert(1),,",
        "p6,Maybe,1,EUR,,,perhaps",
        "ok,Twice,1,EUR,,,",
    )
    done = kaeru(database_url, "catalog", "import", str(bad))
    assert done.exit_code == 1
    output = " ".join(done.output.split())
    for expected in (
        "line 3: product_id is required",
        "line 4: name is required",
        "line 5: price needs its currency: fill the currency column, e.g. EUR",
        "line 6: price 'twelve' is not an amount: write e.g. 12.50",
        "line 7: image_url must be an http(s):// link",
        "line 8: available 'perhaps' is not true or false",
        "line 9: product_id 'ok' is also on line 2: keep one row per product",
        "has 7 problem(s): nothing was imported",
    ):
        assert expected in output, expected
    assert catalogue(database_url) == {}

    header = written(tmp_path, "wrong.csv", "id,name", "1,x")
    done = kaeru(database_url, "catalog", "import", str(header))
    assert done.exit_code == 1
    assert "line 1: unknown column(s) 'id'" in " ".join(done.output.split())
    broken = tmp_path / "broken.json"
    broken.write_text('[{"product_id": "a", "name": "A"},\n {"product_id": }]')
    done = kaeru(database_url, "catalog", "import", str(broken))
    assert done.exit_code == 1
    assert "line 2: not JSON" in " ".join(done.output.split())
    nested = tmp_path / "nested.json"
    nested.write_text('[{"product_id": {"id": 1}, "name": "A"}, 3]')
    done = kaeru(database_url, "catalog", "import", str(nested))
    assert done.exit_code == 1
    said = " ".join(done.output.split())
    assert "item 1: product_id: give text, a number or true/false" in said
    assert "item 2: not an object" in said
    assert catalogue(database_url) == {}


def test_a_product_imported_unavailable_is_not_recommended_after_the_refresh(
    database_url: str, tmp_path: Path
) -> None:
    lines = ["tea,Tea,,,,,", "cup,Cup,,,,,", "pot,Pot,,,,,"]
    first = written(tmp_path, "c.csv", HEADER, *lines)
    assert kaeru(database_url, "catalog", "import", str(first)).exit_code == 0
    for n in range(3):
        add_order(database_url, f"o-{n}", "tea", "cup", "pot")
    refreshed = kaeru(database_url, "recommendations", "refresh")
    assert refreshed.exit_code == 0, refreshed.output
    assert "from 3 order(s): 6 bought-together pair(s)" in " ".join(refreshed.output.split())

    def shown() -> list[str]:
        with session(database_url) as s:
            return [p.product_id for p in recommendations.for_products(s, ["tea"], 3).products]

    assert shown() == ["cup", "pot"]
    withdrawn = written(tmp_path, "w.csv", "product_id,name,available", "cup,Cup,false")
    assert kaeru(database_url, "catalog", "import", str(withdrawn)).exit_code == 0
    assert shown() == ["pot"]
    assert kaeru(database_url, "recommendations", "refresh").exit_code == 0
    assert shown() == ["pot"]
