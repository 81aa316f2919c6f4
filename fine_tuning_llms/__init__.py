"""fine_tuning_llms: fine-tune Llama-family chat models with transformers + PEFT, offline-first."""

__version__ = "0.1.0"
