"""The KV cache of one generation (`KVCache`) and the host buffers of multi-token calls
(`_BufferPool`), for `DSMoESession` (session.py): what `new_cache`, `forward` and `generate`
bind to ONNX Runtime between calls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .session import DSMoESession


def _direct_run(session, binding):
    """session.run_with_iobinding(binding) as one call: onnxruntime's C-level method on its C-level
    binding where the Python wrappers expose them (between two decode calls there are ~35 us of
    Python and binding work, on caches the step's weights have evicted: the wrapper's frame was
    ~15 us more); the public method where they do not, or where the session's method has been
    replaced (a wrapper that counts or times calls), or where the wrapper has work of its own (its
    bookkeeping of WebGPU graph capture)."""
    c_session = getattr(session, "_sess", None)
    run, c_binding = getattr(c_session, "run_with_iobinding", None), getattr(binding, "_iobinding", None)
    capture = getattr(c_session, "is_webgpu_graph_capture_enabled", lambda: False)
    if run is None or c_binding is None or "run_with_iobinding" in vars(session) or capture():
        return lambda: session.run_with_iobinding(binding)
    return lambda: run(c_binding, None)


class KVCache:
    """The KV cache of one generation: preallocated [batch, kv_heads, capacity, head_dim] buffers
    bound as both past and present (GroupQueryAttention writes each call's keys and values in
    place, at their slots), or, without a capacity, the last call's presents fed back as pasts."""

    def __init__(self, session: DSMoESession, batch: int, capacity: int | None):
        import onnxruntime as ort

        self.s, self.shared, self.capacity = session, capacity is not None, capacity
        self._binding = None
        self._step_ids = None        # step(): its bound token buffer,
        self._mask = self._total = None  # the mask of the slots written (record_mask) and their count
        self._bound_by = None        # "step" while step()'s inputs are the bound ones
        self._step_outputs: list[np.ndarray] | None = None
        self._step_shape = self._bound = None
        self._lent: list[np.ndarray] | None = None
        if self.shared:
            shape = (batch, session.num_kv_heads, capacity, session.head_dim)
            device_id = session.device_id if session.device != "cpu" else 0
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, session.kv_dtype, session.device, device_id)
                           for _ in session.past_names]
        else:
            self.values = session.empty_past(batch)

    def binding(self):
        """The I/O binding of the next call: made once for a shared cache (its buffers stay bound
        as past and present; each call rebinds only its inputs and host outputs), per call for a
        growing one."""
        s = self.s
        self._bound_by = "forward"
        if self.shared and self._binding is not None:
            return self._binding
        binding = s.session.io_binding()
        for name, value in zip(s.past_names, self.values):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # outputs come back in binding order
        for name, value in zip(s.present_names, self.values):
            if self.shared:
                binding.bind_ortvalue_output(name, value)
            else:  # the cache stays on the session's device between calls
                binding.bind_output(name, s.device, s.device_id if s.device != "cpu" else 0)
        for name in s.active_names:
            binding.bind_output(name, "cpu")
        if self.shared:
            self._binding = binding
        return binding

    def record_mask(self, mask: np.ndarray) -> None:
        """Shared cache: `forward` passes each call's attention_mask [batch, total] here, so that
        `step` knows the slots written so far and continues from them."""
        batch, total = mask.shape
        if total > self.capacity:
            return  # the call fails in ONNX Runtime (the cache has no slot for it)
        if self._mask is None or self._mask.shape[0] != batch:
            self._mask = np.ones((batch, self.capacity), np.int64)
        self._mask[:, :total] = mask
        self._mask[:, total:] = 1
        self._total = total

    def step(self, tokens: np.ndarray):
        """One token per row (`tokens` [batch]) at the next slot of a shared cache, after a
        `forward` call on it (the prompt); returns (logits, active) as DSMoESession.forward does.
        The token ids and the logits_to_keep value stay bound from step to step (the ids written
        into the bound buffer); the mask is a view of one preallocated [batch, capacity] buffer
        (a copy for batch > 1, where the first columns are not contiguous). Python and binding
        work between two decode calls: ~35 us on the 2-core Xeon (d = 2048 int4, 1.5 ms steps;
        rebinding every input took ~100)."""
        if not self.shared or self._total is None:
            raise InputError("KVCache.step continues a shared cache after a forward call on it (the "
                             "prompt): this cache " + ("grows per call (use forward)" if not self.shared
                                                       else "has had no forward call yet"))
        batch = self._mask.shape[0]
        tokens = np.asarray(tokens)
        if tokens.shape != (batch,):
            raise InputError(f"tokens: expected one id per row, shape [{batch}], got shape {list(tokens.shape)}")
        if self._total >= self.capacity:
            raise InputError(f"the cache holds {self.capacity} tokens (prompt + max_new_tokens - 1), all "
                             "written: no slot left for another step")
        s, binding = self.s, self._binding
        if self._bound_by != "step":  # the first step, or a forward call rebound the inputs
            import onnxruntime as ort

            if self._step_ids is None or self._step_ids.shape[0] != batch:
                self._step_ids = np.zeros((batch, 1), np.int64)
                self._step_ids_value = ort.OrtValue.ortvalue_from_numpy(self._step_ids)
            binding.bind_ortvalue_input("input_ids", self._step_ids_value)
            if s.has_logits_to_keep:
                binding.bind_ortvalue_input("logits_to_keep", s._keep_value(1))
            self._bound_by = "step"
            self._run_step = _direct_run(s.session, binding)
        self._step_ids[:, 0] = tokens
        mask = self._mask[:, :self._total + 1]
        binding.bind_cpu_input("attention_mask", mask if batch == 1 else np.ascontiguousarray(mask))
        host = self.bind_host_outputs(binding, batch, 1, 1)
        self._run_step()
        self._total += 1
        return host[0], host[1:]

    def bind_host_outputs(self, binding, batch: int, seq: int, logits_seq: int) -> list[np.ndarray] | None:
        """Shared cache: bind numpy buffers for logits ([batch, logits_seq, V]) and active.*
        ([batch, seq, n]) and return them; ORT writes into them. One-token calls reuse theirs,
        larger ones borrow from the session's pool. None for a growing cache."""
        if not self.shared:
            return None
        s = self.s
        shape = (batch, seq, logits_seq)
        if self._bound == shape and shape == self._step_shape:  # every decode step: nothing to rebind
            return self._step_outputs
        import onnxruntime as ort
        if self._lent is not None:  # the previous multi-token call's buffers go back to the session
            s._host_buffers.give(self._lent)  # (its results were valid until this call; a dropped cache keeps them)
            self._lent = None
        if shape == self._step_shape:
            arrays = self._step_outputs
        else:  # reused across calls of this shape: a fresh [B, S, V] array would be page-faulted in each time
            arrays = s._host_buffers.take([((batch, logits_seq, s.vocab_size), s.logits_dtype)] +
                                          [((batch, seq, n), np.bool_) for n in s.num_experts])
        for name, array in zip(["logits", *s.active_names], arrays):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        if seq == 1:
            self._step_outputs, self._step_shape = arrays, shape
        else:
            self._lent = arrays
        self._bound = shape
        return arrays

    def update(self, presents: list) -> None:
        if not self.shared:
            self.values = list(presents)


class _BufferPool:
    """Host output buffers for multi-token calls, kept for the next call of the same shapes
    (a few per shape set; thread-safe: each buffer is lent to one cache at a time)."""

    def __init__(self, keep: int = 2):
        import threading

        self._free: dict[tuple, list[list[np.ndarray]]] = {}
        self._keep, self._lock = keep, threading.Lock()

    def take(self, specs: list[tuple[tuple, type]]) -> list[np.ndarray]:
        key = tuple((shape, np.dtype(dtype).str) for shape, dtype in specs)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            if len(self._free) > 4 * self._keep:  # other shapes: keep the pool small
                self._free.clear()
        return [np.empty(shape, dtype) for shape, dtype in specs]

    def give(self, arrays: list[np.ndarray]) -> None:
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self._keep:
                free.append(arrays)
