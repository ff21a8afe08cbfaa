"""gradnoise: gradient noise injection for any PyTorch optimizer.

    gn = gradnoise.GradientNoise(opt, schedules.Exponential(sigma0=0.1, gamma=0.99), seed=0)

adds N(0, σ_t²) to every gradient `opt.step()` is about to use, after clipping
and AMP unscaling. See `gradnoise.schedules` for σ_t, `gradnoise.noise` for the
hook (`gradnoise.replicated` for M models trained as one, `gradnoise.lanes` for what
is per model) and `gradnoise.streams` for the keyed streams and the batched op.
"""

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.noise import GradientNoise
from gradnoise.replicated import ReplicatedGradientNoise
from gradnoise.streams import add_noise_

__all__ = ["GradientNoise", "ReplicatedGradientNoise", "UserError", "add_noise_", "schedules"]
__version__ = "0.1.0"
