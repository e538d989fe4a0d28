"""kaeru's HTTP API: Segment-compatible ingestion, the event router, tracking links, admin reads.

Start with :func:`starter.app.create_app`.
"""
