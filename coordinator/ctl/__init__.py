"""coordinatorctl: the operator's command line (status, batches, reload, check-config, plan,
demo, bench) and the daemon's control client (docs/architecture.md)."""
