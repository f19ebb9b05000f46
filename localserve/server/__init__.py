"""The HTTP server: OpenAI- and Anthropic-compatible APIs over one engine (`localserve up`)."""
