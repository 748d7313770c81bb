"""Beam search: keep the ``num_beams`` most likely partial continuations.

Greedy decoding commits to the best token at every step and can miss a
sequence whose first token is slightly less likely but whose whole is more
likely. Beam search keeps W candidates ("beams"). At each step every beam
proposes its next tokens; of the W x V extensions the best by total
log-probability survive. A beam that emits a stop token, or whose text comes to
contain a stop string, becomes a finished hypothesis (ending at that token),
scored ``sum log p / length ** length_penalty`` (length_penalty > 0
favours longer outputs, < 0 shorter). The W beams are one batch of the model,
sharing a KV cache whose rows are reordered as beams are kept or duplicated.
"""

from __future__ import annotations

import torch

from minigpt.infer.fast_decode import decoder_for
from minigpt.infer.generate import Generation, GenerationConfig, _finish, _hits_stop_string, prefill


@torch.no_grad()
def beam_search(
    model: torch.nn.Module, prompt: list[int], config: GenerationConfig, *, tokenizer=None
) -> Generation:
    """The best continuation of one prompt by beam search (deterministic).

    ``config.num_beams`` beams; ``config.early_stopping`` stops as soon as that
    many hypotheses have finished, otherwise search goes on while a running beam
    could still beat the worst finished one. Stop tokens and stop strings (which
    need ``tokenizer``) end hypotheses; sampling settings are ignored.
    """
    W = config.num_beams
    ctx = model.config.max_seq_len
    steps = min(config.max_new_tokens, ctx - len(prompt))
    if steps <= 0:
        return _finish([], "length", tokenizer, config)
    cache, logits = prefill(model, [prompt], len(prompt) + steps)
    cache.reorder(torch.zeros(W, dtype=torch.long))  # W copies of the prompt's cache
    logits = logits.expand(W, -1)
    device = logits.device
    beams: list[list[int]] = [[] for _ in range(W)]
    scores = torch.full((W,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams are the same at first: expand only one
    finished: list[tuple[float, list[int], bool]] = []  # (score, tokens, hit a stop)
    stop_tokens = set(config.stop_tokens)
    decode = decoder_for(model, cache)

    def normalized(score: float, length: int) -> float:
        return score / max(length, 1) ** config.length_penalty

    for step in range(steps):
        logprobs = logits.float().log_softmax(-1)
        candidates = (scores[:, None] + logprobs).view(-1)
        top_scores, top_ids = candidates.topk(min(2 * W, candidates.numel()))
        V = logprobs.shape[-1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top_ids.tolist()):
            if score == float("-inf"):
                break
            row, token = divmod(flat, V)
            hypothesis = beams[row] + [token]
            if token in stop_tokens or _hits_stop_string(hypothesis, config, tokenizer):
                finished.append((normalized(score, step + 1), hypothesis, True))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == W:
                break
        if not keep_rows or _search_done(finished, keep_scores, step + 1, steps, config):
            break
        while len(keep_rows) < W:  # pad with dead beams so the batch keeps its size
            keep_rows.append(keep_rows[0])
            keep_tokens.append(keep_tokens[0])
            keep_scores.append(float("-inf"))
        beams = [beams[r] + [t] for r, t in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, device=device)
        cache.reorder(torch.tensor(keep_rows))
        if step + 1 < steps:
            logits = decode(torch.tensor(keep_tokens, device=device))
    if not finished or not config.early_stopping:  # running beams compete as well
        for beam, score in zip(beams, scores.tolist()):
            if score > float("-inf") and beam:
                finished.append((normalized(score, len(beam)), beam, False))
    best_score, best, stopped = max(finished, key=lambda f: f[0])
    # a running beam was cut by max_new_tokens, or by the context when that was less
    reason = "stop" if stopped else "length" if steps == config.max_new_tokens else "context"
    result = _finish(best, reason, tokenizer, config)
    result.score = best_score
    return result


def _search_done(finished, running_scores, length, steps, config: GenerationConfig) -> bool:
    """Whether no running beam can still beat the finished hypotheses."""
    W = config.num_beams
    if len(finished) < W:
        return False
    if config.early_stopping:
        return True
    worst_kept = sorted(f[0] for f in finished)[-W]
    # log-probs only decrease, so a running beam's best future score is now's
    # (with length_penalty > 0, the most favourable length is the longest one)
    best = max(running_scores)
    best_length = steps if config.length_penalty > 0 and best < 0 else length
    return best / best_length**config.length_penalty <= worst_kept
