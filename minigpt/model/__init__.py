"""minigpt.model -- the GPT model, its config, and saving/loading/converting it.

    from minigpt.model import GPT, GPTConfig, load_model, save_model
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, "my_model");  model = load_model("my_model")

Hugging Face / GGUF interop lives in :mod:`minigpt.model.hf`.
"""

from minigpt.model.config import PRESETS, GPTConfig
from minigpt.model.gpt import GPT
from minigpt.model.io import load_model, save_model

__all__ = ["GPT", "GPTConfig", "PRESETS", "load_model", "save_model"]
