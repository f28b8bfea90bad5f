"""The layout planner: a machine's layout (VMs, cores, memory) placed on its NUMA topology, and
what an operator applies from it (docs/architecture.md). Pure; imports the shared core only."""
