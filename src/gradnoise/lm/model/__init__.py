"""The GPT (one model or M replicas batched), its weights on disk, and sampling text from it."""
