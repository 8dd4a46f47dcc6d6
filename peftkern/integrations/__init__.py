"""Wiring peftkern into models: Hugging Face PEFT (peft.py) and plain transformers models (transformers.py)."""
