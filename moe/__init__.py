"""Sparse mixture-of-experts intent classifiers that keep learning."""

__version__ = "0.1.0"
