"""minigpt.model -- the GPT model, its config, and saving/loading/converting it.

from minigpt.model import GPT, GPTConfig, save_model, load_model
model = GPT(GPTConfig.preset("tiny"))
"""

from minigpt.model.config import PRESETS, GPTConfig
from minigpt.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS"]
