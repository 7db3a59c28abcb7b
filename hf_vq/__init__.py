"""hf-vq: vector quantizers as Hugging Face models."""
