"""kaeru.commerce's reader of an order's items: one reading for every journey and ingestion."""

from __future__ import annotations

from typing import Any

from kaeru.commerce import MAX_QUANTITY, MAX_URL_LENGTH, OrderedItem, order_items_of


def test_each_item_is_read_in_order_with_its_own_currency() -> None:
    props: dict[str, Any] = {
        "currency": "eur",
        "products": [
            {
                "product_id": "p-1",
                "name": "Linen dress  https://evil.example/x",
                "price": 49.9,
                "quantity": 2,
                "image_url": "https://shop.example/p-1.jpg",
                "url": "https://shop.example/p-1",
            },
            {"sku": 7, "price": "1500", "currency": "jpy"},
            {"id": "p-3", "price": 3, "currency": "nope"},
        ],
    }
    assert order_items_of(props) == [
        OrderedItem(
            product_id="p-1",
            name="Linen dress",
            quantity=2,
            price_minor=4990,
            currency="EUR",
            image_url="https://shop.example/p-1.jpg",
            url="https://shop.example/p-1",
        ),
        OrderedItem("7", None, 1, 1500, "JPY"),
        # An unusable currency is the order's, as for the order's total.
        OrderedItem("p-3", None, 1, 300, "EUR"),
    ]


def test_unusable_items_and_values_are_left_out() -> None:
    long_url = "https://shop.example/" + "a" * MAX_URL_LENGTH
    props: dict[str, Any] = {
        "products": [
            "p-0",
            {"name": "no id"},
            {"product_id": True},
            {"product_id": "p-1", "quantity": MAX_QUANTITY + 1, "price": "abc", "url": long_url},
            {"product_id": "p-1", "quantity": 0, "price": None, "image_url": 5},
        ]
    }
    assert order_items_of(props) == [
        OrderedItem("p-1", None, 1, None, "USD"),
        OrderedItem("p-1", None, 1, None, "USD"),  # repeated as the order lists it
    ]


def test_an_order_without_a_products_list_has_no_items() -> None:
    assert order_items_of({}) == []
    assert order_items_of({"products": {"product_id": "p-1"}}) == []
