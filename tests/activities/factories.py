"""Small factories for activity tests: rows written the way ingestion writes them."""

from __future__ import annotations

from typing import Any

from sqlmodel import select

from kaeru.db import session
from kaeru.models import Customer, Order, OrderLine, Product, Touchpoint


def add_customer(url: str, customer_id: str, email: str | None) -> None:
    with session(url) as s:
        s.add(Customer(customer_id=customer_id, email=email))


def add_products(url: str, *product_ids: str, **fields: Any) -> None:
    with session(url) as s:
        for product_id in product_ids:
            s.add(
                Product(
                    product_id=product_id,
                    name=fields.get("name", f"Product {product_id}"),
                    price_minor=fields.get("price_minor", 1000),
                    currency=fields.get("currency", "USD"),
                    image_url=f"https://cdn.shop.example/{product_id}.jpg",
                    url=f"https://shop.example/p/{product_id}",
                )
            )


def add_order(url: str, order_id: str, *product_ids: str, customer_id: str = "buyer") -> None:
    with session(url) as s:
        s.add(Order(order_id=order_id, customer_id=customer_id, total_minor=0, currency="USD"))
        for product_id in product_ids:
            s.add(OrderLine(order_id=order_id, product_id=product_id))


def touchpoints(url: str, kind: str | None = None) -> list[Touchpoint]:
    with session(url) as s:
        query = select(Touchpoint).order_by(Touchpoint.id)  # type: ignore[arg-type]
        rows = list(s.exec(query))
    return [row for row in rows if kind is None or row.kind == kind]
