"""nmoe: a serving engine for DeepSeek-V3-class mixture-of-experts models."""

__version__ = "0.1.0"
