"""The live loop and the APIs over the engine: ``LiveEngine`` (requests submitted while it steps),
``LLM`` (text in, text out) and the OpenAI-compatible HTTP server."""
