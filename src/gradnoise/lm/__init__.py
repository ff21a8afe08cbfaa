"""The small-LM harness: corpora (`data`), a nanoGPT-style GPT (`model`), its trainer
(`training`), a run's files (`storage`) and the benchmarks (`bench`).

from gradnoise.lm import GPT
model = GPT.from_pretrained("exports/shakespeare")
"""

from gradnoise.lm.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
