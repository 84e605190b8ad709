"""Tiny random backbones built offline as ordinary Hugging Face folders (demo names, tests, benchmarks)."""
