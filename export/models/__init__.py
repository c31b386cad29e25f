"""One file per Hugging Face MoE `model_type`; shared leaf layers in `layers.py`."""
