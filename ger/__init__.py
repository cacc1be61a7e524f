"""ger: zero-shot Generalized Emotion Recognition with vision-language models."""

__version__ = "0.1.0"
