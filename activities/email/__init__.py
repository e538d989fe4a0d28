"""Email: render a journey's message from Jinja2 templates and send it over SMTP, at most once.

One file per concern:

- :mod:`.activity`: the ``send_email`` activity, which ties the others together;
- :mod:`.message_log`: the row per message (table ``email_messages``) and its state machine;
- :mod:`.gate`: may this message be sent (suppressions, the topic rule; consent later);
- :mod:`.render`: template families, their variables, helpers, partials and the footer;
- :mod:`.links`: where links and images may point;
- :mod:`.smtp`: the SMTP conversation and how its refusals are read;
- :mod:`.signature`: DKIM signatures with the shop's key;
- :mod:`.addresses`: the recipient's address, and masking it for histories.
"""

from activities.email.activity import EmailActivities
from activities.email.addresses import (
    MAX_ADDRESS,
    mask_address,
    message_id_for,
    normalise_address,
    recipient_address,
    scrub,
)
from activities.email.gate import may_send, suppression_of
from activities.email.message_log import (
    BOUNCED,
    DATA,
    PENDING,
    SENDING,
    SENT,
    SKIPPED,
    SMTP_SUPERSEDED,
    UNCONFIRMED,
)
from activities.email.render import (
    MAX_SUBJECT,
    MAX_TEXT,
    TEMPLATE_FAILED,
    TEMPLATE_MISSING,
    TEMPLATES,
)
from activities.email.smtp import SMTP_DEFERRED, SMTP_MISCONFIGURED, SMTP_UNREACHABLE

__all__ = [
    "BOUNCED",
    "DATA",
    "MAX_ADDRESS",
    "MAX_SUBJECT",
    "MAX_TEXT",
    "PENDING",
    "SENDING",
    "SENT",
    "SKIPPED",
    "SMTP_DEFERRED",
    "SMTP_MISCONFIGURED",
    "SMTP_SUPERSEDED",
    "SMTP_UNREACHABLE",
    "TEMPLATES",
    "TEMPLATE_FAILED",
    "TEMPLATE_MISSING",
    "UNCONFIRMED",
    "EmailActivities",
    "mask_address",
    "may_send",
    "message_id_for",
    "normalise_address",
    "recipient_address",
    "scrub",
    "suppression_of",
]
