"""Llama-family models: config, weight loading (HF folders and GGUF), forward, tokenizer."""
