"""minigpt.infer -- decoding: the KV cache, sampling, the generation engine, beam search.

from minigpt.infer import generate
out = generate(model, [prompt_ids], temperature=0.8, top_p=0.95, max_new_tokens=50)
print(out[0].tokens, out[0].finish_reason)
"""

from minigpt.infer.beam import beam_search
from minigpt.infer.generate import Generation, GenerationConfig, generate, prefill
from minigpt.infer.kv_cache import KVCache
from minigpt.infer.sampling import filter_logits, repetition_penalty, sample
from minigpt.infer.session import ChatSession

__all__ = [
    "ChatSession",
    "Generation",
    "GenerationConfig",
    "KVCache",
    "beam_search",
    "filter_logits",
    "generate",
    "prefill",
    "repetition_penalty",
    "sample",
]
