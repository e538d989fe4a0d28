"""kaeru's custom search attributes: one pure module the workflows and the Temporal client share.

Their names are what operators filter journeys on: never rename one (running journeys and
saved queries depend on them). No personal data goes into them.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

CUSTOMER_ID = SearchAttributeKey.for_keyword("KaeruCustomerId")
STEP = SearchAttributeKey.for_keyword("KaeruStep")
OUTCOME = SearchAttributeKey.for_keyword("KaeruOutcome")
#: Why a running journey waits before its next outside step: ``kill-switch`` or ``paused``
#: (kaeru/holds.py); unset while it is not held.
HELD = SearchAttributeKey.for_keyword("KaeruHeld")
SEARCH_ATTRIBUTES = (CUSTOMER_ID, STEP, OUTCOME, HELD)
