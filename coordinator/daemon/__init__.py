"""coordinatord: the barrier, the batch pipeline, the agents' hub, the ledger, control and
metrics. Imports the shared core only; never the agents (docs/architecture.md)."""
