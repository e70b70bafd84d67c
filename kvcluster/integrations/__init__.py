"""Integrations with inference engines. ``hf``: Hugging Face transformers (optional extra ``hf``)."""
