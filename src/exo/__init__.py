"""exo: one daemon per machine, pooled into one LLM inference service."""
