"""Post-export check: the ONNX model in ONNX Runtime against the PyTorch reference.

Runs a left-padded prefill of a batch of 2 and one cached decode step, and
compares logits and every present key/value. Relative error here means
max |ort - ref| / max |ref| over an output (valid positions only). The reference
runs with the graph's positions, the cache slots (graph/decoder.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .graph import interface


# Router scores within this distance of the threshold count as ties (float32 logits of ORT and
# PyTorch differ by ~1e-6 relative; float16 by ~1e-3).
ROUTING_MARGIN_FP32 = 1e-5
ROUTING_MARGIN_HALF = 2e-3
MAX_PROMPTS = 5  # prompts tried before validating on the last one anyway


@dataclass
class ValidationReport:
    max_abs_error: float
    max_rel_error: float
    worst_output: str
    outputs_checked: int
    logits_rel_error: float = 0.0
    top1_agreed: int = 0     # valid positions where ORT's and the reference's most likely token agree
    top1_positions: int = 0  # of these
    # The file as written when the check ran on a copy at accuracy_level 0 (MatMulNBits and the
    # int4 sparse op with float32 activations).
    as_written: "ValidationReport | None" = None

    def summary(self) -> str:
        text = (f"max |ORT - PyTorch| = {self.max_abs_error:.3g} (relative {self.max_rel_error:.3g}, "
                f"worst: {self.worst_output}) over {self.outputs_checked} outputs, prefill + 1 cached step")
        if self.as_written is not None:
            w = self.as_written
            # int8 activations move router scores near the threshold across it, so a cache entry
            # downstream of a flipped block can differ a lot; the logits and their argmax say what
            # that does to the model's output.
            text += (f", checked at accuracy_level 0 (float32 activations); the file as written (its accuracy_level): "
                     f"logits relative {w.logits_rel_error:.3g}, the same top-1 token at {w.top1_agreed} of "
                     f"{w.top1_positions} positions, worst relative {w.max_rel_error:.3g} ({w.worst_output})")
        return text


def make_session(path: str | Path, *, threads: int | None = None, custom_ops: bool = True):
    """A CPU session, with the op library registered unless `custom_ops` is false."""
    import onnxruntime as ort

    import dsmoe_runtime

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the optional logits_to_keep input draws a warning at every load
    if custom_ops:
        dsmoe_runtime.register(opts)
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def prompt_inputs(vocab_size: int, *, batch: int = 2, seq: int = 8, pad: int = 2, seed: int = 0):
    """Random ids with row 0 left-padded by `pad` tokens; positions are the slots 0..seq-1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :pad] = 0
    return ids, mask, slot_positions(batch, 0, seq)


def slot_positions(batch: int, past: int, seq: int) -> torch.Tensor:
    """The positions the graph gives a call's tokens: their cache slots past .. past + seq - 1."""
    return torch.arange(past, past + seq).expand(batch, seq).contiguous()


def _feeds(ids, mask, past) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    names = interface.past_names(len(past))
    for (k, v), kn, vn in zip(past, names[0::2], names[1::2]):
        feeds[kn], feeds[vn] = k.numpy(), v.numpy()
    return feeds


def validate_export(model, onnx_path: str | Path, *, seed: int = 0) -> ValidationReport:
    """Validates on the prompt of `seed`, or of the next seeds while the prompt puts a router
    score so close to its threshold that float rounding may break the tie differently in ONNX
    Runtime and PyTorch (one block flips and the comparison fails for no fault of the export)."""
    session = make_session(onnx_path, custom_ops=model.sparse)
    margin = ROUTING_MARGIN_FP32 if next(model.parameters()).dtype == torch.float32 else ROUTING_MARGIN_HALF
    ties, hooks = _watch_routing_ties(model, margin)
    try:
        for attempt in range(MAX_PROMPTS):
            ties.clear()
            report = _validate_prompt(model, session, seed + attempt)
            if not any(ties):
                break
        return report
    finally:
        for hook in hooks:
            hook.remove()


def _watch_routing_ties(model, margin: float):
    """Forward hooks on every router that record whether a score came within `margin` of the threshold."""
    ties: list[bool] = []
    hooks = []
    for module in model.modules():
        moe, router = getattr(module, "moe", None), getattr(module, "router", None)
        if moe is None or router is None:
            continue

        def hook(_module, _inputs, logits, threshold=moe.threshold):
            ties.append(bool(((torch.sigmoid(logits.float()) - threshold).abs() < margin).any()))

        hooks.append(router.register_forward_hook(hook))
    return ties, hooks


def _validate_prompt(model, session, seed: int) -> ValidationReport:
    n = model.cfg.num_hidden_layers
    out_names = interface.output_names(n)
    ids, mask, pos = prompt_inputs(model.cfg.vocab_size, seed=seed)
    past = model.empty_past(ids.shape[0], dtype=next(model.parameters()).dtype)
    worst = (0.0, 0.0, "")
    checked = logits_worst = agreed = positions = 0
    for step in ("prefill", "decode"):
        with torch.no_grad():
            logits, presents = model(ids, mask, pos, past)
        got = session.run(out_names, _feeds(ids, mask, past))
        want = [logits] + [t for kv in presents for t in kv]
        valid = mask[:, -ids.shape[1]:].bool().numpy()
        for name, g, w in zip(out_names, got, want):
            w = w.numpy()
            if name == "logits":
                g, w = g[valid], w[valid]
            else:  # cache entries of padding positions are never attended to (in float16 they differ)
                kept = mask.bool().numpy()  # [batch, past + seq] = the present's positions
                g, w = g.transpose(0, 2, 1, 3)[kept], w.transpose(0, 2, 1, 3)[kept]
            abs_err = float(np.max(np.abs(g - w))) if w.size else 0.0
            rel_err = abs_err / max(float(np.max(np.abs(w))) if w.size else 0.0, 1e-30)
            if not np.isfinite(g).all():
                abs_err = rel_err = float("inf")
            if name == "logits":
                logits_worst = max(logits_worst, rel_err)
                agreed += int((g.argmax(-1) == w.argmax(-1)).sum())
                positions += len(w)
            if rel_err >= worst[1]:
                worst = (abs_err, rel_err, f"{step} {name}")
            checked += 1
        # Next step: one greedy token per row, the cache from ONNX Runtime's own presents.
        ids = torch.from_numpy(got[0][:, -1].argmax(-1)).unsqueeze(1)
        pos = slot_positions(ids.shape[0], mask.shape[1], 1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        past = [(torch.from_numpy(got[1 + 2 * i]), torch.from_numpy(got[2 + 2 * i])) for i in range(n)]
    return ValidationReport(max_abs_error=worst[0], max_rel_error=worst[1], worst_output=worst[2],
                            outputs_checked=checked, logits_rel_error=logits_worst, top1_agreed=agreed,
                            top1_positions=positions)
