"""Codecs, codec language models and their building blocks."""
