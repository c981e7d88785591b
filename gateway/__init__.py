"""The gateway: the public entry point that orchestrates tokenize -> prefill -> decode -> detokenize."""
