"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p
(applied in that order, as transformers does), with a numpy Generator; before either, an
optional repetition penalty."""
from __future__ import annotations

import numpy as np


def processed_logits(logits: np.ndarray, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> np.ndarray:
    """float64 [B, V]: logits / temperature, with -inf outside top-k and outside the top-p nucleus
    (the smallest set of most likely tokens whose probability reaches top_p; at least one token)."""
    x = np.asarray(logits, dtype=np.float64) / float(temperature)
    x = np.where(np.isnan(x), -np.inf, x)
    vocab = x.shape[-1]
    if top_k and top_k < vocab:
        kth = np.partition(x, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, axis=-1)
        p = _softmax(sorted_x)
        before = np.cumsum(p, axis=-1) - p          # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, -np.inf, x)
    return x


def penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits [B, V] with the tokens each row has seen (bool [B, V]: its prompt and what it has
    generated) made less likely, as transformers' repetition_penalty and onnxruntime-genai's do
    (CTRL, arXiv 1909.05858): a positive logit divided by `penalty`, a negative one multiplied."""
    x = np.asarray(logits)
    return np.where(seen, np.where(x > 0, x / penalty, x * penalty), x).astype(x.dtype, copy=False)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def probabilities(logits: np.ndarray, **kw) -> np.ndarray:
    """The distribution `sample_tokens` draws from, [B, V] float64."""
    return _softmax(processed_logits(logits, **kw))


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1).astype(np.int64, copy=False)


def sample_tokens(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> np.ndarray:
    """One token per row of `logits` [B, V], drawn with one `rng.random()` per row (inverse CDF)."""
    p = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0])[:, None] * cdf[:, -1:]
    idx = np.sum(cdf <= u, axis=-1)        # the first token whose CDF exceeds u: never one of p = 0
    return np.minimum(idx, p.shape[-1] - 1).astype(np.int64)
