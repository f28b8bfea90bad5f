"""One error hierarchy for the whole project.

    CoordinatorError
    ├── ConfigError          bad or unreadable configuration (names file and key)
    ├── TopologyError        the NUMA layout does not fit the config, or sysfs is unreadable
    ├── LayoutError          a machine layout plan that over-subscribes or contradicts itself
    ├── BindingError         an agent's memory policy or CPU mask is not what it was told
    ├── StagingError         a batch could not be copied to node-local memory
    │   └── NoSpaceError     the node-local tmpfs has too little free space
    ├── ParquetError         a file that should be Parquet is not readable as Parquet
    ├── BatchFinishedError   a publish into a batch whose folder the coordinator removed
    ├── ProtocolError        a malformed message on the agent or control socket
    ├── AgentError           an agent reported an error or went away mid-step
    ├── DatabaseError        PostgreSQL is unreachable or refused a write
    │   └── NotLeaderError   another coordinator holds the leader lock
    ├── LakeError            the data lake refused a write
    └── ControlError         the control socket could not be reached or answered with an error
        ├── DaemonNotRunning nothing listens on the control socket
        └── StateUnknown     the daemon did not (fully) answer: its state is unknown

Only the CLI maps these to exit codes.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CoordinatorError):
    """The configuration is unreadable or invalid; the message names file and key."""


class TopologyError(CoordinatorError):
    """The NUMA topology could not be read or does not fit the configuration."""


class LayoutError(CoordinatorError):
    """A machine layout plan is inconsistent or over-subscribed."""


class BindingError(CoordinatorError):
    """A process is not bound to the NUMA node (memory or CPUs) it was told to use."""


class StagingError(CoordinatorError):
    """Copying a batch into node-local memory failed."""


class NoSpaceError(StagingError):
    """The node-local tmpfs lacks the free space a batch needs."""


class ParquetError(CoordinatorError):
    """A file is not a readable Parquet file."""


class BatchFinishedError(CoordinatorError):
    """A model published into a batch that had finished: the coordinator removed its folder
    while the file was being written, so the result was not taken."""


class ProtocolError(CoordinatorError):
    """A message on a socket is malformed, too large or of an unknown type."""


class AgentError(CoordinatorError):
    """A staging agent reported an error or disconnected during a step."""


class DatabaseError(CoordinatorError):
    """PostgreSQL is unreachable or a write failed."""


class NotLeaderError(DatabaseError):
    """Another coordinator holds the leader lock on this database."""


class LakeError(CoordinatorError):
    """Writing to the data lake failed."""


class ControlError(CoordinatorError):
    """The daemon's control socket answered with an error or not at all."""


class DaemonNotRunning(ControlError):
    """No daemon is listening on the control socket."""


class StateUnknown(ControlError):
    """The daemon accepted the connection but gave no whole answer in time."""
