"""Dense LLaMA-family model -> DSMoE model folder, with optional router calibration.

    python -m dsmoe_export.convert DENSE OUT_DIR --experts 8 [--threshold 0.5]
        [--router-init random|fit] [--regroup none|coact] [--target-active 0.5]
        [--calib-text TEXT] [--calibrate TEXT --steps N] [--eval-text TEXT] [--tradeoff 0.3,0.5,...]

DENSE is a Hugging Face folder (model_type llama, mistral or qwen2: SwiGLU FFNs; safetensors) or a
GGUF file / a folder holding one (dequantized to float32 by transformers; needs `gguf` and
`accelerate`: pip install '.[convert]'). OUT_DIR is always the project's LLaMA-format DSMoE folder
(docs/checkpoint-format.md): the dense weights as they were (FFN neurons possibly reordered, which
leaves the dense FFN unchanged), one router per layer, the "dsmoe" block, a "dsmoe_conversion" record
of how it was made, the tokenizer files, and with calibration a report (calibration.md/.json/.png).
See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import TensorReader, expected_shapes, write_folder
from .config import CONFIG_NAME, ModelConfig, parse_config
from .errors import CheckpointError, DSMoEError
from .modeling import DSMoEForCausalLM

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Keys of the source config.json that describe things a LLaMA folder does not have (dropped).
_DROP_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "quantization_config",
              "_name_or_path", "_model_name_or_path", "auto_map", "_attn_implementation_autoset")
MAX_SHARD_BYTES = 5 * 2**30


@dataclass
class DenseModel:
    config: dict                      # LLaMA-format config.json, no "dsmoe" block
    tensors: dict[str, torch.Tensor]  # LLaMA names, as stored (dtype kept)
    source: str
    notes: list[str] = field(default_factory=list)
    tokenizer: object | None = None   # a transformers tokenizer, when the source has one
    copy_files: Callable[[Path], list[str]] = lambda out: []

    @property
    def cfg(self) -> ModelConfig:
        return parse_config(self.config, Path(self.source) / CONFIG_NAME, require_dsmoe=False)


# ------------------------------------------------------------------------------ the input side

def map_config(data: dict, path: Path) -> tuple[dict, list[str], list[str]]:
    """A LLaMA-format config for a llama / mistral / qwen2 config.json.

    Returns (config, notes, zero_biases): zero_biases names the o_proj biases to add as zeros
    (Qwen2 has q/k/v biases but none on o_proj; the LLaMA format's attention_bias is all-or-nothing,
    so o_proj gets an exact zero bias)."""
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object at the top level", file=path)
    mt = data.get("model_type", "llama")
    if mt not in SUPPORTED_TYPES:
        raise CheckpointError(f"unsupported model_type {mt!r} (expected one of {', '.join(SUPPORTED_TYPES)}: "
                              "a LLaMA-family decoder with a SwiGLU gate/up/down FFN)", file=path, field="model_type")
    if data.get("mlp_bias"):
        raise CheckpointError("FFN biases cannot be represented (the DSMoE op has none)", file=path, field="mlp_bias")
    cfg = {k: v for k, v in data.items() if k not in _DROP_KEYS}
    notes: list[str] = []
    zero_biases: list[str] = []
    window = data.get("sliding_window")
    windowed = mt == "mistral" and window or mt == "qwen2" and data.get("use_sliding_window") and window
    if windowed:
        notes.append(f"{mt}: sliding-window attention ({window} tokens) becomes full causal attention; "
                     f"outputs are identical for sequences up to {window} tokens")
    if mt == "qwen2":
        cfg["attention_bias"] = True
        layers = int(data.get("num_hidden_layers", 0))
        zero_biases = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(layers)]
        notes.append("qwen2: q/k/v biases kept; o_proj gets an exact zero bias (attention_bias is all-or-nothing)")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg.pop("dsmoe", None)
    cfg.pop("dsmoe_conversion", None)
    return cfg, notes, zero_biases


def _find_gguf(src: Path) -> Path | None:
    if src.is_file() and src.suffix == ".gguf":
        return src
    if src.is_dir() and not any(src.glob("*.safetensors")):
        found = sorted(src.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"several GGUF files ({', '.join(p.name for p in found)}); pass one of them",
                                  file=src)
    return None


def _load_gguf(path: Path) -> DenseModel:
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError:
        raise CheckpointError("loading a GGUF file needs the packages gguf and accelerate "
                              "(pip install 'dsmoe-export[convert]')", file=path) from None
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    data = model.config.to_dict()
    # to_dict() also carries transformers' generic PretrainedConfig fields: keep the model's own
    for k in ("dtype", "torch_dtype", "transformers_version", "use_cache", "output_hidden_states", "return_dict",
              "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
              "output_attentions", "pretraining_tp"):
        data.pop(k, None)
    cfg, notes, zero_biases = map_config(data, path)
    cfg["torch_dtype"] = "float32"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    notes.insert(0, f"GGUF {path.name}: weights dequantized to float32 by transformers")
    dense = DenseModel(config=cfg, tensors={}, source=str(path), notes=notes, tokenizer=tokenizer,
                       copy_files=lambda out: _save_tokenizer(tokenizer, out))
    dense.tensors = _select(state, dense.cfg, zero_biases, path)
    return dense


def _save_tokenizer(tokenizer, out: Path) -> list[str]:
    return sorted(Path(p).name for p in tokenizer.save_pretrained(str(out)) if Path(p).is_file()
                  and Path(p).name != CONFIG_NAME)


def _select(state: dict, cfg: ModelConfig, zero_biases: list[str], where: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in expected_shapes(cfg, with_routers=False).items():
        if name in zero_biases and name not in state:
            out[name] = torch.zeros(shape)
            continue
        if name not in state:
            raise CheckpointError(f"tensor missing (expected shape {list(shape)})", file=where, field=name)
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"expected shape {list(shape)}, got {list(t.shape)}", file=where, field=name)
        out[name] = t
    return out


def load_dense(src: str | Path) -> DenseModel:
    """Read a dense LLaMA / Mistral / Qwen2 folder or GGUF file (weights as stored)."""
    from .exporter import TOKENIZER_FILES, copy_files

    src = Path(src)
    if not src.exists():
        raise CheckpointError("does not exist (expected a model folder or a .gguf file)", file=src)
    gguf_path = _find_gguf(src)
    if gguf_path is not None:
        return _load_gguf(gguf_path)
    if not src.is_dir():
        raise CheckpointError("expected a model folder (config.json + *.safetensors) or a .gguf file", file=src)
    cpath = src / CONFIG_NAME
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("missing (expected a Hugging Face config.json)", file=cpath) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot be read: {e}", file=cpath) from None
    cfg, notes, zero_biases = map_config(data, cpath)
    dense = DenseModel(config=cfg, tensors={}, source=str(src), notes=notes)
    reader = TensorReader(src)
    state = {}
    for name, shape in expected_shapes(dense.cfg, with_routers=False).items():
        if name in zero_biases and name not in reader:
            continue
        state[name] = reader.get(name, shape)
    dense.tensors = _select(state, dense.cfg, zero_biases, src)
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        dense.tokenizer = AutoTokenizer.from_pretrained(str(src))
    # else: no tokenizer in the folder (tiny test models): text is read as UTF-8 bytes

    dense.copy_files = lambda out: copy_files(src, out, TOKENIZER_FILES)
    return dense


# --------------------------------------------------------------------------------- the model

def build_model(config: dict, tensors: dict[str, torch.Tensor], *, sparse: bool = True) -> DSMoEForCausalLM:
    cfg = parse_config(config, Path("<convert>"), require_dsmoe=sparse)
    model = DSMoEForCausalLM(cfg, sparse=sparse)
    model.load_tensors({k: v.float() for k, v in tensors.items()})
    return model.eval()


def random_routers(cfg: ModelConfig, n: int, seed: int, router_bias: bool) -> dict[str, torch.Tensor]:
    """The paper's starting point: a random router (std 1/sqrt(d), as nn.Linear's default scale)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_hidden_layers):
        out[f"model.layers.{i}.mlp.router.weight"] = torch.randn(n, cfg.hidden_size, generator=g) / cfg.hidden_size ** 0.5
        if router_bias:
            out[f"model.layers.{i}.mlp.router.bias"] = torch.zeros(n)
    return out


def _routers_of(model: DSMoEForCausalLM) -> dict[str, torch.Tensor]:
    out = {}
    for i, m in enumerate(model.mlps):
        out[f"model.layers.{i}.mlp.router.weight"] = m.router.weight.detach().clone()
        if m.router.bias is not None:
            out[f"model.layers.{i}.mlp.router.bias"] = m.router.bias.detach().clone()
    return out


# ------------------------------------------------------------------------------------- driver

@dataclass
class ConvertOptions:
    experts: int = 8
    threshold: float = 0.5
    weighting: str = "binary"
    rescale: bool = False
    router_init: str = "auto"            # random | fit | auto (fit when there is calibration text)
    regroup: str = "auto"                # none | coact | auto (coact when there is calibration text)
    target_active: float = 0.5           # fitted routers: active fraction on the calibration text
    allocation: str = "global"           # uniform: every layer at target_active; global: per-layer, least loss
    calib_text: Path | None = None       # text for fitting / regrouping (default: the --calibrate text)
    calib_tokens: int = 16384            # tokens of it used for fitting and regrouping
    calibrate: Path | None = None        # text to train the routers on
    eval_text: Path | None = None        # held-out text for perplexity (default: the calibration text's tail)
    eval_tokens: int = 16384
    seq_len: int = 256
    tradeoff: list[float] = field(default_factory=list)
    seed: int = 0
    train: "object | None" = None        # calibrate.TrainConfig
    progress: bool = True


def _log(opts: ConvertOptions, msg: str) -> None:
    if opts.progress:
        print(f"[dsmoe-convert] {msg}", file=sys.stderr, flush=True)


def convert(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """Convert, optionally fit/regroup/calibrate/evaluate; write OUT; return the report dict."""
    from . import calibrate as C

    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    out = Path(out)
    if out.exists() and out.resolve() == Path(src).resolve():
        raise CheckpointError("the output folder must differ from the input", file=out)
    dense = load_dense(src)
    cfg = dense.cfg
    n = opts.experts
    if n < 1 or cfg.intermediate_size % n:
        raise CheckpointError(f"intermediate_size {cfg.intermediate_size} is not divisible by --experts {n}",
                              file=src, field="intermediate_size")
    for note in dense.notes:
        _log(opts, note)
    fit_text = opts.calib_text or opts.calibrate
    router_init = opts.router_init if opts.router_init != "auto" else ("fit" if fit_text else "random")
    regroup = opts.regroup if opts.regroup != "auto" else ("coact" if fit_text else "none")
    if (router_init == "fit" or regroup == "coact") and fit_text is None:
        raise DSMoEError("--router-init fit and --regroup coact need calibration text (--calib-text or --calibrate)")
    router_bias = router_init == "fit"
    dsmoe = {"num_experts": n, "threshold": opts.threshold, "rescale": opts.rescale, "weighting": opts.weighting,
             "router_bias": router_bias}
    config = dict(dense.config, dsmoe=dsmoe)
    tensors = dict(dense.tensors)
    report: dict = {"source": str(src), "notes": dense.notes, "dsmoe": dsmoe, "router_init": router_init,
                    "regroup": regroup, "allocation_mode": opts.allocation, "seed": opts.seed, "seq_len": opts.seq_len}

    def text_chunks(path: Path, max_tokens: int | None):
        ids = C.tokenize_text(Path(path).read_text(encoding="utf-8"), dense.tokenizer, cfg.vocab_size)
        return ids, C.chunk(ids, opts.seq_len, None if max_tokens is None else max(1, max_tokens // opts.seq_len))

    fit_chunks = train_chunks = eval_chunks = None
    if fit_text is not None:
        ids, fit_chunks = text_chunks(fit_text, opts.calib_tokens)
        _log(opts, f"calibration text {fit_text}: {ids.numel()} tokens ({len(fit_chunks)} x {opts.seq_len} used "
                   "for fitting)")
    if opts.calibrate is not None:
        ids, train_chunks = text_chunks(opts.calibrate, None)
    if opts.eval_text is not None:
        _, eval_chunks = text_chunks(opts.eval_text, opts.eval_tokens)
    elif train_chunks is not None or fit_chunks is not None:
        # no held-out text given: the last chunks of the calibration text, kept out of training
        pool = train_chunks if train_chunks is not None else fit_chunks
        k = max(1, min(len(pool) // 10, opts.eval_tokens // opts.seq_len))
        eval_chunks = pool[-k:]
        if train_chunks is not None:
            train_chunks = train_chunks[:-k] if len(train_chunks) > k else train_chunks
        _log(opts, f"no --eval-text: evaluating on the last {k} chunks of the calibration text")

    # 1. regroup neurons (dense FFN unchanged), 2. routers, on the dense model's FFN inputs.
    model = build_model(config, {**tensors, **random_routers(cfg, n, opts.seed, router_bias)})
    inputs = None
    resid: list = []
    if fit_chunks is not None:
        t0 = time.perf_counter()
        inputs = C.collect_mlp_inputs(model, fit_chunks, residual_norms=resid)
        _log(opts, f"collected FFN inputs of {len(inputs[0])} tokens x {len(inputs)} layers "
                   f"({time.perf_counter() - t0:.1f}s)")
    if regroup == "coact":
        t0 = time.perf_counter()
        for i, m in enumerate(model.mlps):
            perm = C.coactivation_groups(m, inputs[i][:4096], n, seed=opts.seed + i)
            C.permute_ffn(tensors, i, perm)
        model = build_model(config, {**tensors, **random_routers(cfg, n, opts.seed, router_bias)})
        _log(opts, f"regrouped FFN neurons by co-activation ({time.perf_counter() - t0:.1f}s)")
    tc = (opts.train or C.TrainConfig(seed=opts.seed)) if opts.calibrate is not None else None
    # with an annealed calibration target, the routers start at the schedule's first target
    start = tc.target_start if tc is not None and tc.target_start is not None else opts.target_active
    if tc is not None and tc.control is None:  # default: hold the schedule whenever the routers have biases
        tc.control = router_bias
    if router_init == "fit":
        t0 = time.perf_counter()
        with torch.no_grad():
            for m, h in zip(model.mlps, inputs):
                w, b = C.fit_router(m, h, n, start, opts.threshold)
                m.router.weight.copy_(w)
                m.router.bias.copy_(b)
        if opts.allocation == "global":
            fractions = C.allocate(model, inputs, resid, start)
            report["allocation"] = fractions
            if tc is not None and tc.control:
                end = fractions if start == opts.target_active else C.allocate(model, inputs, resid, opts.target_active)
                tc.layer_targets = (fractions, end)
                report["allocation_end"] = end
            C.rebias(model, inputs, fractions)
        _log(opts, f"fitted routers to block contributions, target active fraction {start} "
                   f"({opts.allocation} over layers; {time.perf_counter() - t0:.1f}s)")
        report["target_active"] = opts.target_active
        report["fit_target"] = start

    # 3. evaluate, calibrate, evaluate.
    if eval_chunks is not None:
        report["eval_tokens"] = int(eval_chunks.numel())
        t0 = time.perf_counter()
        report["dense"] = {"ppl": C.evaluate(model, eval_chunks, dense=True).ppl}
        r = C.evaluate(model, eval_chunks)
        report["converted"] = {"ppl": r.ppl, "active": r.active, "mean_active": r.mean_active}
        _log(opts, f"held-out perplexity: dense {report['dense']['ppl']:.3f}, converted {r.ppl:.3f} at active "
                   f"fraction {r.mean_active:.3f} ({time.perf_counter() - t0:.1f}s)")
    if tc is not None:
        if tc.control and not router_bias:
            raise DSMoEError("target control (--control) shifts router biases: it needs --router-init fit")
        target = "" if tc.target_active is None else (
            f" above {tc.target_active:g}" if tc.target_start is None else
            f" above a target annealed {tc.target_start:g} -> {tc.target_active:g} over {tc.anneal:.0%} of the steps")
        _log(opts, f"calibrating: {tc.steps} steps x {tc.batch} x {opts.seq_len} tokens "
                   f"({'routers' if tc.train_experts == 'none' else f'routers and experts ({tc.train_experts})'}; "
                   f"{'KL to dense logits' if tc.distill else 'cross-entropy'} + {tc.sparsity_weight:g} x sparsity"
                   f"{target}{'; per-layer bias control' if tc.control else ''})")
        log = C.train(model, train_chunks, tc, progress=opts.progress)
        report["training"] = {"steps": tc.steps, "batch": tc.batch, "lr": tc.lr, "sparsity_weight": tc.sparsity_weight,
                              "target_active": tc.target_active, "target_start": tc.target_start,
                              "anneal": tc.anneal, "control": tc.control, "distill": tc.distill,
                              "train_experts": tc.train_experts, "expert_lr": tc.expert_lr,
                              "seconds": log.seconds, "cpu_seconds": log.cpu_seconds, "threads": log.threads,
                              "steps_done": len(log.steps), "time_budget": tc.time_budget,
                              "task_loss": log.task_loss, "sparsity": log.sparsity, "target": log.target}
        if tc.train_experts != "none":
            for i, m in enumerate(model.mlps):
                for proj in C.EXPERT_SETS[tc.train_experts]:
                    name = f"model.layers.{i}.mlp.{proj}.weight"
                    tensors[name] = getattr(m, proj).weight.detach().to(tensors[name].dtype).clone()
        if eval_chunks is not None:
            r = C.evaluate(model, eval_chunks)
            report["calibrated"] = {"ppl": r.ppl, "active": r.active, "mean_active": r.mean_active}
            _log(opts, f"after calibration: perplexity {r.ppl:.3f} at active fraction {r.mean_active:.3f} "
                       f"({log.seconds:.0f}s of training)")
    routers = _routers_of(model)

    # 4. trade-off curve: one bias shift per layer to each target active fraction (on the fit text).
    if opts.tradeoff and eval_chunks is not None:
        if not router_bias:
            _log(opts, "--tradeoff needs router biases (--router-init fit); skipped")
        else:
            resid_sparse: list = []
            inputs_sparse = C.collect_mlp_inputs(model, fit_chunks if fit_chunks is not None else eval_chunks,
                                                 dense=False, residual_norms=resid_sparse)
            curve = []
            for f in opts.tradeoff:
                if opts.allocation == "global":
                    C.rebias(model, inputs_sparse, C.allocate(model, inputs_sparse, resid_sparse, f))
                else:
                    C.rebias(model, inputs_sparse, f)
                r = C.evaluate(model, eval_chunks)
                curve.append({"target": f, "ppl": r.ppl, "mean_active": r.mean_active, "active": r.active})
                _log(opts, f"trade-off: target {f:.2f} -> active {r.mean_active:.3f}, perplexity {r.ppl:.3f}")
            report["tradeoff"] = curve
            model.load_tensors({**tensors, **routers})

    # 5. write.
    config["dsmoe_conversion"] = {
        "tool": f"dsmoe_export.convert {__version__}", "source": Path(str(src)).name,
        "router_init": router_init, "regroup": regroup, "seed": opts.seed,
        **({"target_active": opts.target_active, "allocation": opts.allocation} if router_init == "fit" else {}),
        **({"calibration_steps": report["training"]["steps"]} if "training" in report else {}),
        "notes": dense.notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_folder(out, config, {**tensors, **routers}, max_shard_bytes=MAX_SHARD_BYTES)
    report["tokenizer_files"] = dense.copy_files(out)
    report["seconds"] = time.perf_counter() - t_start
    if "dense" in report:
        write_report(out, report)
    _log(opts, f"wrote {out} in {report['seconds']:.0f}s")
    return report


def dense_baseline(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """The fair reference for a calibration that trains FFN weights: the dense model's same FFN
    weights fine-tuned on the same text (cross-entropy, same steps, batch, learning rate and seed),
    evaluated on the same held-out windows. Writes OUT/baseline.json; returns the report."""
    from . import calibrate as C

    tc = opts.train
    if opts.calibrate is None or tc is None or tc.train_experts == "none":
        raise DSMoEError("--dense-baseline needs --calibrate TEXT and --train-experts")
    if opts.eval_text is None:
        raise DSMoEError("--dense-baseline needs --eval-text (held-out text)")
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    dense = load_dense(src)
    model = build_model(dense.config, dense.tensors, sparse=False)
    tok = lambda path: C.tokenize_text(Path(path).read_text(encoding="utf-8"), dense.tokenizer, dense.cfg.vocab_size)
    train_chunks = C.chunk(tok(opts.calibrate), opts.seq_len)
    eval_chunks = C.chunk(tok(opts.eval_text), opts.seq_len, max(1, opts.eval_tokens // opts.seq_len))
    report: dict = {"source": str(src), "seed": opts.seed, "seq_len": opts.seq_len, "eval_tokens": int(eval_chunks.numel())}
    report["dense"] = {"ppl": C.evaluate(model, eval_chunks, dense=True).ppl}
    _log(opts, f"held-out perplexity of the dense model: {report['dense']['ppl']:.3f}")
    log = C.train(model, train_chunks, tc, progress=opts.progress, dense=True)
    report["finetuned_dense"] = {"ppl": C.evaluate(model, eval_chunks, dense=True).ppl}
    report["training"] = {"steps": tc.steps, "steps_done": len(log.steps), "batch": tc.batch,
                          "train_experts": tc.train_experts,
                          "expert_lr": tc.expert_lr, "loss": "cross-entropy", "seconds": log.seconds,
                          "cpu_seconds": log.cpu_seconds, "threads": log.threads, "task_loss": log.task_loss}
    report["seconds"] = time.perf_counter() - t_start
    _log(opts, f"after fine-tuning ({tc.train_experts}, {tc.steps} steps x {tc.batch}, lr {tc.expert_lr:g}): "
               f"perplexity {report['finetuned_dense']['ppl']:.3f} ({log.seconds:.0f}s)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "baseline.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "baseline.json")
    return report


# ------------------------------------------------------------------------------------- report

def report_markdown(report: dict) -> str:
    lines = [f"# Conversion report: {report['source']}", "",
             f"dsmoe: `{json.dumps(report['dsmoe'])}`; router init `{report['router_init']}`, "
             f"regroup `{report['regroup']}`, allocation `{report.get('allocation_mode', 'uniform')}`, "
             f"seed {report['seed']}; held-out {report.get('eval_tokens', 0)} tokens "
             f"in windows of {report['seq_len']}.", "",
             "| model | perplexity | vs dense | FFN active fraction |", "|---|---|---|---|",
             f"| dense | {report['dense']['ppl']:.3f} | 1.000 | 1.000 |"]
    stages = [s for s in ("converted", "calibrated") if s in report]
    for s in stages:
        r = report[s]
        label = "converted (before calibration)" if s == "converted" else "calibrated"
        lines.append(f"| {label} | {r['ppl']:.3f} | {r['ppl'] / report['dense']['ppl']:.3f} | {r['mean_active']:.3f} |")
    if "training" in report:
        t = report["training"]
        sched = "" if t.get("target_start") is None else f" (annealed from {t['target_start']:g})"
        experts = t["train_experts"] if t["train_experts"] == "none" else f"{t['train_experts']} (lr {t['expert_lr']:g})"
        done = t.get("steps_done", t["steps"])
        steps = f"{t['steps']} steps" if done == t["steps"] else f"{done} of {t['steps']} steps (time budget)"
        lines += ["", f"Calibration: {steps} x batch {t['batch']}, lr {t['lr']:g}, sparsity weight "
                      f"{t['sparsity_weight']:g}, target {t['target_active']}{sched}, bias control "
                      f"{t.get('control', False)}, distill {t['distill']}, experts trained {experts}: "
                      f"{t['seconds']:.0f}s wall, {t.get('cpu_seconds', 0):.0f}s CPU, {t.get('threads', 0)} threads."]
    lines += ["", "Active fraction per layer:", "",
              "| layer | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for i in range(len(report[stages[0]]["active"])):
        lines.append(f"| {i} | " + " | ".join(f"{report[s]['active'][i]:.3f}" for s in stages) + " |")
    if report.get("tradeoff"):
        lines += ["", "Trade-off (one router-bias shift per layer to the target on the calibration text):", "",
                  "| target | active fraction | perplexity | vs dense |", "|---|---|---|---|"]
        for p in report["tradeoff"]:
            lines.append(f"| {p['target']:.2f} | {p['mean_active']:.3f} | {p['ppl']:.3f} | "
                         f"{p['ppl'] / report['dense']['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    (out / "calibration.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "calibration.md").write_text(report_markdown(report), encoding="utf-8")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[dsmoe-convert] matplotlib not installed: no calibration.png (pip install '.[bench]')", file=sys.stderr)
        return
    stages = [s for s in ("converted", "calibrated") if s in report]
    ncols = 2 if report.get("tradeoff") else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    for s in stages:
        ax.plot(report[s]["active"], marker="o", label=f"{s} (ppl {report[s]['ppl']:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN active fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"dense ppl {report['dense']['ppl']:.2f}")
    ax.legend()
    if report.get("tradeoff"):
        ax = axes[0][1]
        pts = sorted(report["tradeoff"], key=lambda p: p["mean_active"])
        ax.plot([p["mean_active"] for p in pts], [p["ppl"] for p in pts], marker="o", label="converted model")
        ax.axhline(report["dense"]["ppl"], color="gray", ls="--", label="dense")
        ax.axhline(1.2 * report["dense"]["ppl"], color="gray", ls=":", label="dense + 20%")
        ax.set_xlabel("FFN active fraction")
        ax.set_ylabel("held-out perplexity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.convert",
                                description="Convert a dense LLaMA / Mistral / Qwen2 folder or GGUF file into a DSMoE "
                                            "model folder (docs/conversion.md).")
    p.add_argument("src", metavar="DENSE", help="dense model folder (config.json + *.safetensors) or .gguf file")
    p.add_argument("out", metavar="OUT_DIR", help="DSMoE folder to write")
    p.add_argument("--experts", type=int, default=8, help="n: blocks per FFN (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="tau (default: %(default)s)")
    p.add_argument("--weighting", choices=("binary", "score"), default="binary",
                   help="weight of an active block (default: binary: a converted model's experts expect 1)")
    p.add_argument("--rescale", action="store_true", help="multiply by n/k as the paper (default: off; see docs)")
    p.add_argument("--router-init", choices=("auto", "random", "fit"), default="auto",
                   help="random (the paper) or fit (least squares to each block's contribution norm on the "
                        "calibration text); auto = fit when there is calibration text")
    p.add_argument("--regroup", choices=("auto", "none", "coact"), default="auto",
                   help="reorder FFN neurons so that co-activated ones share a block before cutting "
                        "(coact; auto = coact when there is calibration text)")
    p.add_argument("--target-active", type=float, default=0.5,
                   help="fitted routers: active fraction per layer on the calibration text; with --calibrate "
                        "also the sparsity loss's target (default: %(default)s)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="global",
                   help="fitted routers: every layer at --target-active (uniform), or per-layer fractions "
                        "averaging it, spent where dropping blocks loses most (global, the default)")
    p.add_argument("--calib-text", type=Path, help="text for fitting and regrouping (default: the --calibrate text)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="tokens of it used (default: %(default)s)")
    p.add_argument("--calibrate", type=Path, metavar="TEXT_FILE", help="train the routers on this text")
    p.add_argument("--steps", type=int, default=200, help="calibration steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="router learning rate (default: %(default)g)")
    p.add_argument("--sparsity-weight", type=float, default=1.0,
                   help="weight of the sparsity loss (default: %(default)g)")
    p.add_argument("--no-target", action="store_true",
                   help="plain sparsity loss (the paper's mean gate) instead of its excess over --target-active")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="train on next-token cross-entropy instead of KL to the dense model's logits")
    p.add_argument("--train-experts", nargs="?", const="all", default="none", choices=("none", "gate_up", "all"),
                   help="also train FFN weights (bare flag: all of gate/up/down; gate_up: only those) at --expert-lr")
    p.add_argument("--expert-lr", type=float, default=2e-4, help="FFN weights' learning rate (default: %(default)g)")
    p.add_argument("--target-start", type=float, default=None,
                   help="anneal the calibration target from this active fraction down to --target-active "
                        "(the fitted routers start here)")
    p.add_argument("--anneal", type=float, default=0.5,
                   help="share of the steps over which --target-start is annealed (default: %(default)g)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="after every step, shift each layer's router bias towards its (annealed, allocated) target "
                        "active fraction on the batch: holds the sparsity on schedule (default: on with fitted "
                        "routers, which it needs)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock cap on the calibration loop: it stops after the step that reaches it, and "
                        "--target-start's annealing follows the steps or the time, whichever is further along")
    p.add_argument("--dense-baseline", action="store_true",
                   help="instead of converting: fine-tune the dense model's FFN weights (--train-experts) on the "
                        "--calibrate text with cross-entropy, same steps, batch and --expert-lr, and report its "
                        "held-out perplexity next to the original's (OUT_DIR/baseline.json): how much of a "
                        "calibrated model's perplexity is domain adaptation")
    p.add_argument("--eval-text", type=Path, help="held-out text for perplexity (default: the calibration text's tail)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens evaluated (default: %(default)s)")
    p.add_argument("--tradeoff", default="", help="comma-separated target active fractions for the trade-off curve, "
                                                  "e.g. 0.3,0.4,0.5,0.7,1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .calibrate import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tradeoff = [float(x) for x in args.tradeoff.split(",") if x.strip()]
    except ValueError:
        print(f"dsmoe-convert: error: --tradeoff: expected numbers separated by commas, got {args.tradeoff!r}",
              file=sys.stderr)
        return 1
    train = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, sparsity_weight=args.sparsity_weight,
                        target_active=None if args.no_target else args.target_active, distill=args.distill,
                        train_experts=args.train_experts, expert_lr=args.expert_lr, seed=args.seed,
                        target_start=args.target_start, anneal=args.anneal, control=args.control,
                        time_budget=None if args.time_budget is None else 60.0 * args.time_budget)
    opts = ConvertOptions(experts=args.experts, threshold=args.threshold, weighting=args.weighting,
                          rescale=args.rescale, router_init=args.router_init, regroup=args.regroup,
                          target_active=args.target_active, allocation=args.allocation, calib_text=args.calib_text,
                          calib_tokens=args.calib_tokens, calibrate=args.calibrate, eval_text=args.eval_text,
                          eval_tokens=args.eval_tokens, seq_len=args.seq_len, tradeoff=tradeoff, seed=args.seed,
                          train=train, progress=not args.quiet)
    try:
        if args.dense_baseline:
            report = dense_baseline(args.src, args.out, opts)
            return 0
        report = convert(args.src, args.out, opts)
    except KeyboardInterrupt:
        print("dsmoe-convert: interrupted", file=sys.stderr)
        return 130
    except (DSMoEError, ValueError) as e:
        if args.debug:
            raise
        print(f"dsmoe-convert: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet and "dense" in report:
        print(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
