"""`DSMoESession`: an ONNX Runtime session over a DSMoE export, with generation.

The export's interface (docs/runtime.md): inputs `input_ids`, `attention_mask`,
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim]; outputs `logits`,
`present.{i}.key|value`, and with `--active-outputs` `active.{i}` [batch, seq, n]. Graphs
written by dsmoe_export (GroupQueryAttention, metadata "dsmoe_export.graph") let past and present
share one preallocated buffer per tensor, written in place; graphs with a `position_ids` input
(earlier exports, other exporters) get positions and a cache that grows by concatenation.
"""
from __future__ import annotations

import ctypes
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ._library import register, set_huge_page_advice
from .errors import InputError, LibraryNotFoundError, ModelError
from .hugepages import NewMemory
from .kv_cache import KVCache, _BufferPool
from .sampling import greedy_tokens, penalize_repeats, sample_tokens
from .stats import ActivationStats

OP_DOMAIN, OP_TYPE = "org.dsmoe", "GatedBlockSparseFFN"
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
SHARED_CACHE_GRAPHS = ("gqa-v1",)  # metadata "dsmoe_export.graph" values whose cache can be shared
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ACTIVE = re.compile(r"^active\.(\d+)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

Streamer = Callable[[int, np.ndarray], None]


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports (0 when there is no driver or no device). onnxruntime-gpu
    lists CUDAExecutionProvider as available even on machines without either."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


def default_providers() -> list[str]:
    """CUDA EP first when onnxruntime has it and a GPU is there, else the CPU EP."""
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers() and cuda_device_count() > 0:
        return [CUDA_EP, CPU_EP]
    return [CPU_EP]


def _model_header(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _dim(shape, axis):
    d = shape[axis] if len(shape) > axis else None
    return d if isinstance(d, int) else None


def _is_real(value) -> bool:
    """A Python or numpy real number (numpy scalars come from configs and arrays), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class DSMoESession:
    """An onnxruntime.InferenceSession over a DSMoE export, with the op library registered.

    providers: None picks the CUDA EP (with the library's CUDA kernels) when onnxruntime-gpu
        and a usable GPU are there, else the CPU EP; a list is passed to onnxruntime as is.
        `self.providers` says what onnxruntime actually chose.
    threads / inter_op_threads: onnxruntime's intra- and inter-op thread pools (None: its default).
    session_options: an onnxruntime.SessionOptions to start from (it is modified: library, threads);
        None: ONNX Runtime's defaults, logging errors only.
    library: True registers the installed library (or $DSMOE_OPS_LIBRARY), a path registers that
        file, False registers none.
    allow_fallback: without the library a sparse model is refused, since onnxruntime would run
        the op's ONNX function body (same results, dense speed); True accepts that.
    allow_dense: a model without the custom op (a --dense export) is refused unless True.
    huge_pages: on the CPU EP under Linux, move the memory the session allocated (its weights)
        onto 2 MB pages after it is created, in a background thread at idle priority
        (hugepages.py: a decode step streams every weight, and 4 KB pages cost a TLB miss each);
        `self.huge_pages.bytes` says how much has moved, `self.huge_pages.wait()` waits for it.
        False (or $DSMOE_HUGEPAGES=0) leaves ONNX Runtime's pages as they are.
    """

    def __init__(self, onnx_path: str | Path, providers: Sequence | None = None, *, threads: int | None = None,
                 inter_op_threads: int | None = None, session_options=None, library: bool | str | Path = True,
                 provider_options: Sequence[dict] | None = None, allow_fallback: bool = False,
                 allow_dense: bool = False, device_id: int = 0, huge_pages: bool = True):
        import onnxruntime as ort

        if not isinstance(huge_pages, bool):
            raise InputError(f"huge_pages: expected True or False, got {huge_pages!r}")
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file (expected an ONNX model written by dsmoe_export)")
        if session_options is None:
            session_options = ort.SessionOptions()
            # Errors only: ORT warns about every overridable initializer (the export's optional
            # logits_to_keep input) when it loads a model, which is not a problem to report.
            session_options.log_severity_level = 3
        opts = session_options
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        self.library_path: str | None = None
        if library is not False:
            try:
                self.library_path = register(opts, None if library is True else library)
            except LibraryNotFoundError:
                if not allow_fallback:
                    raise
                warnings.warn("op library not found: running the op's ONNX function body (dense speed)")
        self.device_id = device_id
        chosen = providers is None
        if chosen:
            providers = default_providers()
            if provider_options is None and providers[0] == CUDA_EP:
                provider_options = [{"device_id": device_id}, {}]
        new_memory = NewMemory(huge_pages)
        # The library's own advice would collapse the op weights synchronously, inside the
        # creation; the background move below covers them, so it is off meanwhile.
        advice = (set_huge_page_advice(self.library_path, False)
                  if new_memory.enabled and self.library_path is not None else None)
        try:
            providers = self._create(opts, providers, provider_options, chosen)
        finally:
            if advice:
                set_huge_page_advice(self.library_path, True)
        self.providers = self.session.get_providers()
        if list(providers)[0] == CUDA_EP and self.providers[0] != CUDA_EP:
            warnings.warn(f"CUDAExecutionProvider was asked for but onnxruntime chose {self.providers}: "
                          "check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        self.device = "cuda" if self.providers[0] == CUDA_EP else "cpu"
        self._read_interface(allow_dense=allow_dense, allow_fallback=allow_fallback)
        self._stats = ActivationStats(self.num_experts) if self.has_active_outputs else None
        self._host_buffers = _BufferPool()
        self._keep_values: dict[int, object] = {}
        if self.device == "cpu":  # only for a session that is kept (the checks above passed)
            new_memory.collapse()
        self.huge_pages = new_memory

    # ------------------------------------------------------------------ set-up
    def _create(self, opts, providers, provider_options, chosen: bool) -> list:
        """self.session over self.path; returns the providers finally asked for (the CPU EP where
        the CUDA EP picked by default cannot run the export)."""
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers),
                                                provider_options=provider_options)
            return list(providers)
        except Exception as e:
            if not (chosen and providers[0] == CUDA_EP and "gate_up_tile" in str(e)):
                raise self._load_error(e) from e
        # A float32 export with gate/up in the CPU kernel's slabs (the exporter's default): the
        # CUDA kernel reads rows only, so the GPU picked by default cannot run it.
        warnings.warn(f"{self.path} stores the sparse op's gate/up weights in the CPU kernel's slab layout "
                      "(gate_up_tile = 32, the float32 default), which the CUDA kernel does not read: running "
                      "on the CPU EP. For the GPU, export with --gate-up-layout rows or --dtype float16.")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=[CPU_EP])
        except Exception as e2:
            raise self._load_error(e2) from e2
        return [CPU_EP]

    def _load_error(self, e: Exception) -> Exception:
        msg = str(e)
        if "gate_up_tile" in msg:
            return ModelError(f"{self.path}: the sparse op's gate/up weights are in the CPU kernel's slab layout "
                              "(gate_up_tile = 32, the float32 export's default), which the CUDA kernel does not "
                              "read: run it on the CPU EP, or export with --gate-up-layout rows (or --dtype "
                              f"float16) for the CUDA EP ({msg.strip()[:300]})")
        if OP_TYPE in msg or OP_DOMAIN in msg:
            how = ("the op library is not registered (library=False)" if self.library_path is None
                   else f"the op library {self.library_path} did not provide a kernel for it")
            return ModelError(f"{self.path}: onnxruntime cannot run the {OP_DOMAIN}::{OP_TYPE} nodes: {how}, "
                              f"and the model has no ONNX function fallback for them ({msg.strip()[:300]})")
        return ModelError(f"{self.path}: onnxruntime cannot load the model: {msg.strip()[:500]}")

    def _read_interface(self, *, allow_dense: bool, allow_fallback: bool) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST.match(n))})
        if missing or not layers or "logits" not in outputs:
            raise ModelError(f"{self.path}: not a causal LM export with a KV cache (dsmoe_export's interface): "
                             f"missing inputs {missing or ''}{' past_key_values.*' if not layers else ''}"
                             f"{' output logits' if 'logits' not in outputs else ''}; found inputs {list(inputs)}")
        self.num_layers = len(layers)
        if layers != list(range(self.num_layers)):
            raise ModelError(f"{self.path}: past_key_values layers are not 0..{self.num_layers - 1}: {layers}")
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        absent = [n for n in self.past_names if n not in inputs] + [n for n in self.present_names if n not in outputs]
        if absent:
            raise ModelError(f"{self.path}: KV cache tensors missing: {absent[:4]}")
        k0 = inputs["past_key_values.0.key"]
        self.num_kv_heads, self.head_dim = _dim(k0.shape, 1), _dim(k0.shape, 3)
        if self.num_kv_heads is None or self.head_dim is None:
            raise ModelError(f"{self.path}: past_key_values.0.key must have static kv_heads and head_dim, "
                             f"got shape {k0.shape}")
        self.kv_dtype = _ORT_TYPES.get(k0.type, np.float32)
        self.vocab_size = _dim(outputs["logits"].shape, 2)
        self.logits_dtype = _ORT_TYPES.get(outputs["logits"].type, np.float32)
        self.input_dtypes = {n: _ORT_TYPES.get(i.type) for n, i in inputs.items()}
        active = sorted((int(m.group(1)), n) for n in outputs if (m := _ACTIVE.match(n)))
        self.active_names = [n for _, n in active]
        self.has_active_outputs = len(active) == self.num_layers
        self.num_experts = [_dim(outputs[n].shape, 2) for n in self.active_names] if self.has_active_outputs else []
        meta = self.session.get_modelmeta().custom_metadata_map
        self.has_position_ids = "position_ids" in inputs
        self.has_logits_to_keep = any(i.name == "logits_to_keep" for i in self.session.get_overridable_initializers())
        self.shared_cache = meta.get("dsmoe_export.graph") in SHARED_CACHE_GRAPHS and not self.has_position_ids
        self.max_position = int(meta["dsmoe_export.max_position"]) if "dsmoe_export.max_position" in meta else None
        if "dsmoe_export.sparse" in meta:
            self.sparse = meta["dsmoe_export.sparse"] == "1"
        else:  # not written by dsmoe_export: look at the graph itself
            graph = _model_header(self.path).graph
            self.sparse = any(n.domain == OP_DOMAIN and n.op_type == OP_TYPE for n in graph.node)
        self.dsmoe_config = json.loads(meta["dsmoe_export.dsmoe"]) if "dsmoe_export.dsmoe" in meta else None
        if not self.sparse and not allow_dense:
            raise ModelError(f"{self.path}: the model has no {OP_DOMAIN}::{OP_TYPE} node (a --dense export or a "
                             "plain LLaMA export): nothing for DSMoESession to do; pass allow_dense=True to run it "
                             "anyway (the baseline; `python -m dsmoe_runtime`: --allow-dense)")
        if self.sparse and self.library_path is None and not allow_fallback:
            raise ModelError(f"{self.path}: a sparse model in a session without the op library would run the op's "
                             "ONNX function body (dense speed): register the library (library=True or a path) or "
                             "pass allow_fallback=True")
        if self.has_active_outputs and any(n is None for n in self.num_experts):
            raise ModelError(f"{self.path}: active.* outputs need a static last dim (num_experts)")

    @property
    def stats(self) -> ActivationStats:
        """Activation statistics of every run since creation or `stats.reset()`."""
        if self._stats is None:
            raise ModelError(f"{self.path}: no active.* outputs, so no activation statistics: export with "
                             "`python -m dsmoe_export MODEL_DIR OUT.onnx --active-outputs`")
        return self._stats

    def __repr__(self) -> str:
        return (f"DSMoESession({str(self.path)!r}, providers={self.providers}, layers={self.num_layers}, "
                f"sparse={self.sparse}, active_outputs={self.has_active_outputs})")

    # ------------------------------------------------------------------ one model call
    def check_feeds(self, feeds: dict) -> None:
        """Raise InputError naming the input when `feeds` does not fit the model."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in inputs if n not in feeds]
        extra = [n for n in feeds if n not in inputs]
        if missing or extra:
            raise InputError(f"feeds do not match the model's inputs: missing {missing[:6]}, unknown {extra[:6]}")
        batch = None
        for name, value in feeds.items():
            shape = tuple(value.shape())  if callable(getattr(value, "shape", None)) else tuple(np.shape(value))
            want = inputs[name].shape
            if len(shape) != len(want):
                raise InputError(f"{name}: expected rank {len(want)} {want}, got shape {list(shape)}")
            for axis, (got, w) in enumerate(zip(shape, want)):
                if isinstance(w, int) and got != w:
                    raise InputError(f"{name}: axis {axis} must be {w} (shape {want}), got shape {list(shape)}")
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise InputError(f"{name}: batch {shape[0]} differs from the other inputs' {batch}")
            dtype = self.input_dtypes.get(name)
            if isinstance(value, np.ndarray) and dtype is not None and value.dtype != dtype:
                raise InputError(f"{name}: expected dtype {np.dtype(dtype).name}, got {value.dtype.name}")

    def run(self, output_names: Sequence[str] | None, feeds: dict) -> list[np.ndarray]:
        """`InferenceSession.run` with the feeds checked first (clear errors)."""
        self.check_feeds(feeds)
        return self.session.run(None if output_names is None else list(output_names), feeds)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch` rows. With `capacity` (tokens, prompt included) and a
        graph that allows it, one preallocated buffer per tensor that every call updates in place;
        else the cache grows by one present per call."""
        if capacity is not None and self.max_position is not None and capacity > self.max_position:
            raise InputError(f"prompt + max_new_tokens = {capacity} exceeds the model's {self.max_position} "
                             "positions (max_position_embeddings)")
        return KVCache(self, batch, capacity if self.shared_cache else None)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: KVCache,
                position_ids: np.ndarray | None = None, *, logits_to_keep: int = 0):
        """One call with I/O binding: returns (logits [B, S, V] numpy, active (numpy [B, S, n] per
        layer, or [])); `cache` is read and updated. `position_ids` only for graphs that take them.
        `logits_to_keep` > 0: only the last positions' logits, where the graph can (exports of this
        project: the lm_head then runs on those positions only).
        With a shared cache, logits and active are buffers that the cache's next call reuses
        (copy them to keep them past that)."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise InputError(f"logits_to_keep: expected an int >= 0 (0 = every position), got {logits_to_keep!r}")
        ids = np.ascontiguousarray(input_ids, np.int64)
        binding = cache.binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        if self.has_position_ids:
            if position_ids is None:
                raise InputError("position_ids: this model takes them (an export without GroupQueryAttention)")
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        keep = min(int(logits_to_keep), ids.shape[1]) if logits_to_keep and self.has_logits_to_keep else 0
        if self.has_logits_to_keep:  # an overridable initializer: bind_cpu_input refuses those names
            binding.bind_ortvalue_input("logits_to_keep", self._keep_value(keep))
        host = cache.bind_host_outputs(binding, ids.shape[0], ids.shape[1], keep or ids.shape[1])
        self.session.run_with_iobinding(binding)
        if cache.shared:
            cache.record_mask(np.asarray(attention_mask, np.int64))
        if host is not None:  # written in place: no output objects to wrap (they cost ~0.2 ms a call)
            return host[0], host[1:]
        out = binding.get_outputs()
        cache.update(out[1:1 + len(self.present_names)])
        return out[0].numpy(), [v.numpy() for v in out[1 + len(self.present_names):]]

    def _keep_value(self, keep: int):
        import onnxruntime as ort

        if keep not in self._keep_values:
            self._keep_values[keep] = ort.OrtValue.ortvalue_from_numpy(np.array(keep, np.int64))
        return self._keep_values[keep]

    # ------------------------------------------------------------------ generation
    def _check_prompt(self, input_ids, attention_mask):
        ids = np.asarray(input_ids)
        if ids.dtype == object or ids.ndim not in (1, 2):
            raise InputError(f"input_ids: expected [batch, seq] integers (rows of equal length; left-pad shorter "
                             f"prompts and pass attention_mask), got {ids.ndim}-D {ids.dtype} array")
        if ids.ndim == 1:
            ids = ids[None]
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InputError(f"input_ids: expected at least one row and one token, got shape {list(ids.shape)}")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"input_ids: ids must lie in [0, {self.vocab_size}) (the vocabulary), got "
                             f"min {ids.min()} max {ids.max()}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int64)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask: expected the shape of input_ids {list(ids.shape)}, "
                                 f"got {list(mask.shape)}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask: expected 0 (padding) and 1 (token) only")
            mask = mask.astype(np.int64)
            if (mask.sum(1) == 0).any():
                raise InputError(f"attention_mask: rows {np.flatnonzero(mask.sum(1) == 0).tolist()} have no token")
            if (np.diff(mask, axis=1) < 0).any():
                raise InputError("attention_mask: padding must be on the left (0s then 1s in every row); "
                                 "right padding is not supported for generation")
        return ids.astype(np.int64), mask

    def stream(self, input_ids, max_new_tokens: int = 32, *, attention_mask=None, do_sample: bool | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | np.random.Generator | None = None, eos_token_id: int | Iterable[int] | None = None,
               pad_token_id: int | None = None, repetition_penalty: float = 1.0,
               collect_stats: bool = True) -> Iterator[np.ndarray]:
        """Generate step by step: yields each step's tokens, int64 [batch], as soon as they are
        chosen. Arguments as in `generate`."""
        ids, mask = self._check_prompt(input_ids, attention_mask)
        choose = self._chooser(do_sample, temperature, top_k, top_p, seed)
        if not (_is_real(repetition_penalty) and np.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise InputError(f"repetition_penalty: expected a finite number > 0 (1 = off), got {repetition_penalty!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        eos = self._token_set(eos_token_id, "eos_token_id")
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        self._token_set(pad, "pad_token_id")
        stats = self._stats if collect_stats else None
        batch = ids.shape[0]
        finished = np.zeros(batch, bool)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None) if self.has_position_ids else None
        cache = self.new_cache(batch, ids.shape[1] + max(max_new_tokens - 1, 0))
        valid = mask.astype(bool)
        seen = None
        if repetition_penalty != 1.0:  # each row's prompt tokens (not its left padding), then its new ones
            seen = np.zeros((batch, self.vocab_size), bool)
            rows, cols = np.nonzero(valid)
            seen[rows, ids[rows, cols]] = True
        for step in range(max_new_tokens):
            if step == 0:
                logits, active = self.forward(ids, mask, cache, pos, logits_to_keep=1)
            elif cache.shared:  # the lean step: the steps' inputs stay bound (cache.step)
                logits, active = cache.step(tokens)
            else:
                mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
                pos = pos[:, -1:] + 1 if pos is not None else None
                logits, active = self.forward(tokens[:, None], mask, cache, pos, logits_to_keep=1)
            if stats is not None and active:
                stats.add(active, valid)
            last = logits[:, -1, :]
            tokens = choose(last if seen is None else penalize_repeats(last, seen, repetition_penalty))
            if eos:
                tokens = np.where(finished, pad, tokens).astype(np.int64)
            if seen is not None:
                seen[np.arange(batch), tokens] = True
            yield tokens
            if eos:
                finished |= np.isin(tokens, list(eos))
                if finished.all():
                    return
            if stats is not None:
                valid = ~finished[:, None]

    def generate(self, input_ids, max_new_tokens: int = 32, *, attention_mask=None, do_sample: bool | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | np.random.Generator | None = None, eos_token_id: int | Iterable[int] | None = None,
                 pad_token_id: int | None = None, repetition_penalty: float = 1.0, streamer: Streamer | None = None,
                 collect_stats: bool = True) -> np.ndarray:
        """Continue the prompts with the KV cache; returns int64 ids [batch, prompt + new].

        input_ids [batch, seq] (or one row); attention_mask [batch, seq] with 0 for left padding.
        Greedy unless do_sample (which is on when temperature, top_k, top_p or seed is given):
        logits / temperature, then top-k, then top-p, drawn with numpy's Generator(seed).
        eos_token_id (one or several): a row that produced it is finished and gets pad_token_id
        (default: the smallest eos id, else 0) afterwards; generation stops early when every row
        is finished, so `new` may be < max_new_tokens. repetition_penalty (1 = off; 1.1-1.3 is usual):
        the logits of the tokens a row has seen (its prompt and its new tokens) made less likely
        before the choice, a positive one divided by it and a negative one multiplied, as
        transformers and onnxruntime-genai do. streamer(step, tokens [batch]) is called
        with each step's tokens as they come. With active outputs in the model and collect_stats,
        the run's tokens are added to `self.stats`.
        """
        ids, _ = self._check_prompt(input_ids, attention_mask)
        new = []
        for step, tokens in enumerate(self.stream(input_ids, max_new_tokens, attention_mask=attention_mask,
                                                  do_sample=do_sample, temperature=temperature, top_k=top_k,
                                                  top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                                                  pad_token_id=pad_token_id, repetition_penalty=repetition_penalty,
                                                  collect_stats=collect_stats)):
            new.append(tokens)
            if streamer is not None:
                streamer(step, tokens)
        if not new:
            return ids
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1)

    def _token_set(self, value, what: str) -> set[int]:
        if value is None:
            return set()
        values = [value] if isinstance(value, (int, np.integer)) else list(value)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or (
                    self.vocab_size and v >= self.vocab_size):
                raise InputError(f"{what}: expected token ids in [0, {self.vocab_size}), got {value!r}")
        return {int(v) for v in values}

    @staticmethod
    def _chooser(do_sample, temperature, top_k, top_p, seed):
        if not (_is_real(temperature) and np.isfinite(temperature) and temperature > 0):
            raise InputError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise InputError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
        if not (_is_real(top_p) and 0 < top_p <= 1):
            raise InputError(f"top_p: expected a number in (0, 1] (1 = off), got {top_p!r}")
        if do_sample is None:
            do_sample = temperature != 1.0 or top_k != 0 or top_p != 1.0 or seed is not None
        if not do_sample:
            return greedy_tokens
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return lambda logits: sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
