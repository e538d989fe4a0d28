"""No workflow id in clear in a log line: the Temporal SDK's own messages name workflows by
id, and a journey's id is ``<kind>-<customer id>`` (kaeru/telemetry.py WorkflowIdFilter,
installed by setup_logging for ``kaeru api``, ``worker`` and ``dev``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from temporalio.worker import _workflow_instance

from kaeru.journeys import registry
from kaeru.telemetry import WorkflowIdFilter, key_ref, setup_logging, workflow_ref

JOURNEY = "cart-abandonment-ann.shopper@example.com"
RUN = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def root_handlers() -> Iterator[logging.Logger]:
    """The root logger, put back as it was after the test (pytest's handlers, its level)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    root.handlers, root.level = saved, level


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_sdks_failed_activation_line_names_the_journey_by_reference(
    log_format: str, root_handlers: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    registry()  # loaded, as in the worker: the line keeps the journey's kind
    root_handlers.handlers = []  # as in a fresh process (pytest adds its own for the call)
    setup_logging(logging.INFO, log_format)
    try:
        raise RuntimeError(f"boom in workflow_id={JOURNEY}")
    except RuntimeError as exc:
        error = exc
    # The SDK's own logger and message (worker/_workflow_instance.py, a failed activation).
    _workflow_instance.logger.warning(
        f"Failed activation on workflow CartAbandonment with ID {JOURNEY} and run ID {RUN}",
        exc_info=error,
        extra={"temporal_workflow": {"workflow_id": JOURNEY, "run_id": RUN}},
    )
    written = capsys.readouterr().err
    assert "ann.shopper" not in written and "example.com" not in written
    reference = workflow_ref(JOURNEY, ["cart-abandonment"])
    assert reference == f"cart-abandonment-{key_ref(JOURNEY)}"
    assert f"with ID {reference} and run ID {RUN}" in written
    assert f"workflow_id={reference}" in written  # the exception's text too
    if log_format == "json":
        line = json.loads(written.strip().splitlines()[0])
        assert line["logger"] == "temporalio.worker._workflow_instance"
        assert "RuntimeError" in line["exception"]


def test_the_filter_leaves_other_lines_and_a_reference_alone() -> None:
    line = logging.LogRecord("kaeru.worker", logging.INFO, __file__, 1, "polling %s", ("q",), None)
    assert WorkflowIdFilter().filter(line) and line.getMessage() == "polling q"
    reference = workflow_ref(JOURNEY, ["cart", "cart-abandonment"])  # the longest kind
    assert reference.startswith("cart-abandonment-sha256:")
    again = logging.LogRecord(
        "temporalio.worker._workflow_instance",
        logging.WARNING,
        __file__,
        1,
        "Failed activation on workflow W with ID %s and run ID %s",
        (reference, RUN),
        None,
    )
    WorkflowIdFilter().filter(again)
    assert (
        again.getMessage()
        == f"Failed activation on workflow W with ID {reference} and run ID {RUN}"
    )
    assert workflow_ref("plain") == key_ref("plain")
