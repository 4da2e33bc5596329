"""Serving: the adapter merged into a standalone model and the Ollama Modelfile (tools/export.py, tools/ask.py)."""
