"""Experiments and holdouts as a journey declares them, and who gets which arm.

Pure code with no I/O, so the workflow sandbox runs it: the same customer, journey kind and
experiment always hash to the same arm, on every worker, every replay and every
continue-as-new.

A journey declares its experiments as a class attribute (docs/writing-a-journey.md)::

    experiments = {
        "cart_subject": Experiment(
            step="cart_email",
            variants={"plain": Variant(), "question": Variant()},
        ),
    }

The variant's name reaches the message's template as ``variant`` (a subject or a call to
action that reads ``{% if variant == "question" %}``), a variant may swap the whole template
family (``Variant(template="cart_reminder_short")``) or a wait (``Variant(delay=3600)``), and
every touchpoint of the message carries it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The arm of the customers a journey kind holds out: they enter, are recorded, get nothing.
HOLDOUT = "holdout"


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment.

    Args:
        weight: its share against the other arms' weights (1 and 1: half each).
        template: another template family for the message (its content), or None.
        delay: seconds for the wait the journey reads with ``Journey.delay(step, default)``
            (the wait before this experiment's message), or None: the journey's own.
    """

    weight: int = 1
    template: str | None = None
    delay: float | None = None


@dataclass(frozen=True)
class Experiment:
    """An experiment on one message step: its arms and their weights.

    Args:
        step: the message step it varies (``cart_email``).
        variants: arm name → :class:`Variant`; the first is the control when the journey kind
            has no holdout.
        enabled_by_default: whether it runs unless ``KAERU_<PREFIX>_EXPERIMENTS`` says
            otherwise.
        auto_promote: whether ``KAERU_EXPERIMENT_AUTO_PROMOTE`` may promote its winner.
    """

    step: str
    variants: Mapping[str, Variant] = field(default_factory=dict)
    enabled_by_default: bool = True
    auto_promote: bool = True

    def check(self, name: str) -> None:
        """Refuse an experiment no journey can run (called when the journey class is defined).

        Raises:
            ValueError: fewer than two arms, a weight below 1, or an arm or the experiment
                named ``holdout`` (the name of a journey kind's holdout result).
        """
        if name == HOLDOUT:
            raise ValueError(
                f"an experiment cannot be named {HOLDOUT!r}: it names the journey kind's "
                "holdout result (KAERU_<PREFIX>_HOLDOUT_PERCENT); choose another name"
            )
        if len(self.variants) < 2:
            raise ValueError(f"experiment {name!r} needs at least two variants")
        for arm, variant in self.variants.items():
            if arm == HOLDOUT or not arm or len(arm) > 100:
                raise ValueError(
                    f"experiment {name!r}: {arm!r} cannot name a variant (1-100 characters, "
                    f"not {HOLDOUT!r}, which names the holdout)"
                )
            if variant.weight < 1:
                raise ValueError(
                    f"experiment {name!r}: variant {arm!r} needs a weight of 1 or more"
                )


def bucket(*parts: str) -> float:
    """A number in ``[0, 1)`` from ``parts``: uniform over ids, the same for the same parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(customer_id: str, kind: str, name: str, experiment: Experiment) -> str:
    """The arm of ``experiment`` (named ``name`` in journey kind ``kind``) for a customer:
    by weight, deterministic."""
    point = bucket(kind, name, customer_id) * sum(v.weight for v in experiment.variants.values())
    arms = list(experiment.variants.items())
    for arm, variant in arms:
        if point < variant.weight:
            return arm
        point -= variant.weight
    return arms[-1][0]  # float rounding at the very top of the range


def held_out(customer_id: str, kind: str, percent: float) -> bool:
    """Whether ``percent`` % holdout of journey kind ``kind`` takes this customer
    (deterministic: the same customer is held out of the same kind every time)."""
    return percent > 0 and bucket(kind, HOLDOUT, customer_id) * 100 < percent
