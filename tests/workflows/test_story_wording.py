"""The journey story's wording helpers: message steps and counts as a person says them."""

from workflows.kit import counted, message_name


def test_a_message_step_is_named_like_an_email() -> None:
    assert message_name("cart_email") == "the cart email"
    assert message_name("offer_email") == "the offer email"
    assert message_name("welcome") == "the welcome email"
    assert message_name("best_sellers") == "the best sellers email"


def test_counts_are_singular_or_plural() -> None:
    assert [counted(n, "item") for n in (0, 1, 2)] == ["0 items", "1 item", "2 items"]
