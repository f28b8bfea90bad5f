"""What every process shares: errors, config, the batch lifecycle, the agent protocol, files under
the configured roots, the machine's topology, logging and test hooks. Imports nothing else of
the project (docs/architecture.md)."""
