"""localserve: a workstation/edge LLM server."""

__version__ = "0.1.0"
