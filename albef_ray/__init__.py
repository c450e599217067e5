"""albef-ray: ALBEF vision-language pretraining on Ray."""

__version__ = "0.1.0"
