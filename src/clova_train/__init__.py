"""clova-train: pre-train a Korean GPT-3-class model the HyperCLOVA way."""

__version__ = "0.1.0"
