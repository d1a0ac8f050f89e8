"""The HTTP server: OpenAI-compatible routes over the engine loop (``app.py``)."""
