"""loretta-merge: tensor-train (LoRETTA) adapters, from fine-tuning to deployment."""

__version__ = "0.1.0"
