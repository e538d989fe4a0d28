"""Journeys: one deterministic Temporal workflow class per journey kind, on a shared kit."""
