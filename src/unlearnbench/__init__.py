"""unlearnbench: machine unlearning of in- vs out-of-distribution data in causal language models."""

__version__ = "0.1.0"
