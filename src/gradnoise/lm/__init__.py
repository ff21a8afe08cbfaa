"""The small-LM harness: corpora (`data`), a nanoGPT-style model, its trainer and checkpoints.

from gradnoise.lm import GPT
model = GPT.from_pretrained("exports/shakespeare")
"""

from gradnoise.lm.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
