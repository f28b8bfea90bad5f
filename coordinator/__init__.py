"""numa-coordinator: a NUMA-aware batch coordinator for an ensemble of small language models."""

from __future__ import annotations

__version__ = "0.1.0"
