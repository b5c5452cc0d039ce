"""Serving: a continuous-batching engine over decode slots and an OpenAI-compatible server on it."""

from lsjax.serve.engine import Completion, Engine, EngineConfig, Event, Handle, Request

__all__ = ["Completion", "Engine", "EngineConfig", "Event", "Handle", "Request"]
