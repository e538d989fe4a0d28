"""A small touchpoint history whose right answers are known, for the report's and the
dashboard's end-to-end tests (the analytics' own tests check the edge cases).

Four shoppers enter the cart journey at ``start`` and each gets its reminder email:

- ``c-1`` opens it an hour later (a person), clicks, and buys online the next day: 45.99 EUR;
- ``c-2`` never opens it;
- ``c-3``'s open is a machine's (Apple Mail Privacy Protection): it must not count;
- ``c-4`` opens it two hours later and buys in the store (channel ``pos``) two days later:
  12000 JPY, a currency never added to euros.

Each arm of the ``cart_subject`` experiment has two of them and one buyer: no difference.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from kaeru.db import write_session
from kaeru.models import Customer
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint

KIND = "cart-abandonment"
#: The cart journey's declared experiment: c-1 and c-3 ask a question, c-2 and c-4 name the item.
EXPERIMENT = "cart_subject"

#: What the report of a period holding the whole history says, for every journey together.
KNOWN: dict[str, Any] = {
    "entered": 4,
    "messages_sent": 4,
    "delivered": 4,
    "human_opens": 2,
    "clicks": 1,
    "conversions": 2,
    "revenue": {"EUR": 4599, "JPY": 12000},
}


def seed_known_history(settings: Settings, start: datetime) -> None:
    """Write the history, its first touch at ``start``."""
    with write_session(settings.resolved_database_url) as s:
        for number in range(1, 5):
            customer = f"c-{number}"
            journey = f"{KIND}-{customer}"
            message = {"message_key": f"{journey}/reminder"}
            s.add(Customer(customer_id=customer))

            def touch(kind: str, after: timedelta, **extra: Any) -> None:
                record_touchpoint(
                    s,
                    customer_id=customer,  # noqa: B023 - called before the loop moves on
                    kind=kind,
                    key=f"{journey}/{kind}",  # noqa: B023
                    occurred_at=start + after,
                    **extra,
                )

            on_email = {
                "journey_id": journey,
                "journey_kind": KIND,
                "step": "reminder",
                "channel": "email",
            }
            arm = "asks_a_question" if number % 2 else "names_the_item"
            touch(
                "journey_entered",
                timedelta(0),
                journey_id=journey,
                journey_kind=KIND,
                detail={"arms": {EXPERIMENT: arm}},
            )
            touch("email_sent", timedelta(minutes=1), detail=message, **on_email)
            if number == 1:
                touch(
                    "email_opened",
                    timedelta(hours=1),
                    detail={**message, "machine": False},
                    **on_email,
                )
                touch(
                    "email_clicked",
                    timedelta(hours=1, minutes=2),
                    detail={**message, "machine": False},
                    **on_email,
                )
                touch(
                    "purchase",
                    timedelta(days=1),
                    order_id="o-1",
                    value_minor=4599,
                    currency="EUR",
                    channel="web",
                )
            if number == 3:
                touch(
                    "email_opened",
                    timedelta(minutes=2),
                    detail={**message, "machine": True},
                    **on_email,
                )
            if number == 4:
                touch(
                    "email_opened",
                    timedelta(hours=2),
                    detail={**message, "machine": False},
                    **on_email,
                )
                touch(
                    "purchase",
                    timedelta(days=2),
                    order_id="o-4",
                    value_minor=12000,
                    currency="JPY",
                    channel="pos",
                )
        s.commit()
