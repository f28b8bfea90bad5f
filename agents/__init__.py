"""Per-node staging agents, the cross-check, and the SLM publishing SDK."""

from __future__ import annotations
