"""Serving: a continuous-batching engine over decode slots and an OpenAI-compatible server on it."""

from lsjax.serve.engine import (AdapterInUse, Completion, Engine, EngineConfig, Event, Handle, QueueFull, Request,
                                UnknownAdapter)
from lsjax.serve.lockstep import Lockstep

__all__ = ["AdapterInUse", "Completion", "Engine", "EngineConfig", "Event", "Handle", "Lockstep", "QueueFull",
           "Request", "UnknownAdapter"]
