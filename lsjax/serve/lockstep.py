"""One serving engine over several processes (`jax.distributed`): every process runs the same engine
loop over one mesh, and before each step process 0 (the one taking HTTP requests) sends the others
what arrived, what was cancelled and which adapters to load or unload since the last, so every
process steps the same batch over the same adapters.

The messages travel as a collective over the mesh's devices (`multihost_utils.broadcast_one_to_all`),
the same transport the steps use: a length, then the bytes padded to a power of two, so only a few
shapes ever compile. An idle leader still sends an empty message every `heartbeat` seconds, so the
others never wait in a collective long enough for its transport to give up.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from lsjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Lockstep:
    """The link between the processes of one engine. `leader`: this is process 0."""

    heartbeat: float = 1.0

    def __post_init__(self):
        if jax.process_count() < 2:
            raise ConfigError("a lockstep engine spans processes: call jax.distributed.initialize first "
                              f"(this runtime has {jax.process_count()} process)")
        if not self.heartbeat > 0:
            raise ConfigError(f"heartbeat={self.heartbeat!r} is invalid; expected a positive number of seconds")

    @property
    def leader(self) -> bool:
        return jax.process_index() == 0

    def share(self, message: dict | None) -> dict:
        """Process 0's `message` (a JSON-able dict; None or empty: nothing new), on every process as a
        dict (empty for nothing new); the others pass None."""
        data = json.dumps(message, separators=(",", ":")).encode() if self.leader and message else b""
        size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
        if size == 0:
            return {}
        padded = np.zeros(max(64, 1 << (size - 1).bit_length()), np.uint8)
        padded[:len(data)] = np.frombuffer(data, np.uint8)
        data = np.asarray(multihost_utils.broadcast_one_to_all(padded))[:size].tobytes()
        return json.loads(data)
