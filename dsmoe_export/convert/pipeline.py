"""The conversion, one function per step: load the source, read the texts, regroup, fit routers, evaluate,
calibrate, trade-off curve, write OUT; and the dense baseline (--dense-baseline)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import write_folder
from ..errors import CheckpointError, DSMoEError
from ..modeling import DSMoEForCausalLM
from .regroup import coactivation_groups, permute_ffn
from .report import write_report
from .routers import _routers_of, allocate, fit_router, random_routers, rebias
from .source import DenseModel, build_model, load_dense
from .text import chunk, collect_mlp_inputs, evaluate, tokenize_text
from .training import EXPERT_SETS, TrainConfig, train

MAX_SHARD_BYTES = 5 * 2**30


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
    train: "object | None" = None        # training.TrainConfig
    progress: bool = True


def _log(opts: ConvertOptions, msg: str) -> None:
    if opts.progress:
        print(f"[dsmoe-convert] {msg}", file=sys.stderr, flush=True)


@dataclass
class _Run:
    """One conversion's state, handed from step to step."""
    src: str | Path
    out: Path
    opts: ConvertOptions
    dense: DenseModel
    fit_text: Path | None
    router_init: str                     # random | fit (resolved)
    regroup: str                         # none | coact (resolved)
    config: dict                         # the output config.json
    tensors: dict[str, torch.Tensor]     # the dense weights as written (neurons regrouped, experts trained)
    report: dict
    fit_chunks: torch.Tensor | None = None
    train_chunks: torch.Tensor | None = None
    eval_chunks: torch.Tensor | None = None
    model: DSMoEForCausalLM | None = None
    inputs: list[torch.Tensor] | None = None  # per layer, the dense model's FFN inputs on the fit text
    resid: list = field(default_factory=list)  # per layer, the residual stream's norms there
    tc: TrainConfig | None = None
    start: float = 0.5                   # the routers' first target active fraction

    @property
    def router_bias(self) -> bool:
        return self.router_init == "fit"


def convert(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """Convert, optionally fit/regroup/calibrate/evaluate; write OUT; return the report dict."""
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    run = _load(src, Path(out), opts)
    _read_texts(run)
    # 1. regroup neurons (dense FFN unchanged), 2. routers, on the dense model's FFN inputs.
    _regroup(run)
    _train_config(run)
    _fit_routers(run)
    # 3. evaluate, calibrate, evaluate.
    _evaluate_converted(run)
    _calibrate(run)
    routers = _routers_of(run.model)
    # 4. trade-off curve, 5. write.
    _tradeoff(run, routers)
    return _write(run, routers, t_start)


def _load(src: str | Path, out: Path, opts: ConvertOptions) -> _Run:
    """Read the source, check the options against it, resolve the "auto" choices."""
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
    report: dict = {"source": str(src), "notes": dense.notes, "dsmoe": dsmoe, "router_init": router_init,
                    "regroup": regroup, "allocation_mode": opts.allocation, "seed": opts.seed, "seq_len": opts.seq_len}
    return _Run(src=src, out=out, opts=opts, dense=dense, fit_text=fit_text, router_init=router_init,
                regroup=regroup, config=dict(dense.config, dsmoe=dsmoe), tensors=dict(dense.tensors), report=report)


def _text_chunks(run: _Run, path: Path, max_tokens: int | None):
    seq_len = run.opts.seq_len
    ids = tokenize_text(Path(path).read_text(encoding="utf-8"), run.dense.tokenizer, run.dense.cfg.vocab_size)
    return ids, chunk(ids, seq_len, None if max_tokens is None else max(1, max_tokens // seq_len))


def _read_texts(run: _Run) -> None:
    """The fitting, training and held-out windows."""
    opts = run.opts
    if run.fit_text is not None:
        ids, run.fit_chunks = _text_chunks(run, run.fit_text, opts.calib_tokens)
        _log(opts, f"calibration text {run.fit_text}: {ids.numel()} tokens ({len(run.fit_chunks)} x {opts.seq_len} "
                   "used for fitting)")
    if opts.calibrate is not None:
        ids, run.train_chunks = _text_chunks(run, opts.calibrate, None)
    if opts.eval_text is not None:
        _, run.eval_chunks = _text_chunks(run, opts.eval_text, opts.eval_tokens)
    elif run.train_chunks is not None or run.fit_chunks is not None:
        # no held-out text given: the last chunks of the calibration text, kept out of training
        pool = run.train_chunks if run.train_chunks is not None else run.fit_chunks
        k = max(1, min(len(pool) // 10, opts.eval_tokens // opts.seq_len))
        run.eval_chunks = pool[-k:]
        if run.train_chunks is not None:
            run.train_chunks = run.train_chunks[:-k] if len(run.train_chunks) > k else run.train_chunks
        _log(opts, f"no --eval-text: evaluating on the last {k} chunks of the calibration text")


def _with_random_routers(run: _Run) -> DSMoEForCausalLM:
    routers = random_routers(run.dense.cfg, run.opts.experts, run.opts.seed, run.router_bias)
    return build_model(run.config, {**run.tensors, **routers})


def _regroup(run: _Run) -> None:
    """Build the model; collect the FFN inputs on the fit text; with coact, regroup the neurons."""
    opts = run.opts
    run.model = _with_random_routers(run)
    if run.fit_chunks is not None:
        t0 = time.perf_counter()
        run.inputs = collect_mlp_inputs(run.model, run.fit_chunks, residual_norms=run.resid)
        _log(opts, f"collected FFN inputs of {len(run.inputs[0])} tokens x {len(run.inputs)} layers "
                   f"({time.perf_counter() - t0:.1f}s)")
    if run.regroup == "coact":
        t0 = time.perf_counter()
        for i, m in enumerate(run.model.mlps):
            perm = coactivation_groups(m, run.inputs[i][:4096], opts.experts, seed=opts.seed + i)
            permute_ffn(run.tensors, i, perm)
        run.model = _with_random_routers(run)
        _log(opts, f"regrouped FFN neurons by co-activation ({time.perf_counter() - t0:.1f}s)")


def _train_config(run: _Run) -> None:
    """The calibration's TrainConfig (None without --calibrate) and the routers' first target."""
    opts = run.opts
    tc = run.tc = (opts.train or TrainConfig(seed=opts.seed)) if opts.calibrate is not None else None
    # with an annealed calibration target, the routers start at the schedule's first target
    run.start = tc.target_start if tc is not None and tc.target_start is not None else opts.target_active
    if tc is not None and tc.control is None:  # default: hold the schedule whenever the routers have biases
        tc.control = run.router_bias


def _fit_routers(run: _Run) -> None:
    """--router-init fit: routers fitted to block contributions, then (global) allocated over layers."""
    if run.router_init != "fit":
        return
    opts, model, inputs, start, tc, report = run.opts, run.model, run.inputs, run.start, run.tc, run.report
    t0 = time.perf_counter()
    with torch.no_grad():
        for m, h in zip(model.mlps, inputs):
            w, b = fit_router(m, h, opts.experts, start, opts.threshold)
            m.router.weight.copy_(w)
            m.router.bias.copy_(b)
    if opts.allocation == "global":
        fractions = allocate(model, inputs, run.resid, start)
        report["allocation"] = fractions
        if tc is not None and tc.control:
            end = fractions if start == opts.target_active else allocate(model, inputs, run.resid, opts.target_active)
            tc.layer_targets = (fractions, end)
            report["allocation_end"] = end
        rebias(model, inputs, fractions)
    _log(opts, f"fitted routers to block contributions, target active fraction {start} "
               f"({opts.allocation} over layers; {time.perf_counter() - t0:.1f}s)")
    report["target_active"] = opts.target_active
    report["fit_target"] = start


def _evaluate_converted(run: _Run) -> None:
    """Held-out perplexity of the dense model and of the converted one, before calibration."""
    if run.eval_chunks is None:
        return
    report = run.report
    report["eval_tokens"] = int(run.eval_chunks.numel())
    t0 = time.perf_counter()
    report["dense"] = {"ppl": evaluate(run.model, run.eval_chunks, dense=True).ppl}
    r = evaluate(run.model, run.eval_chunks)
    report["converted"] = {"ppl": r.ppl, "active": r.active, "mean_active": r.mean_active}
    _log(run.opts, f"held-out perplexity: dense {report['dense']['ppl']:.3f}, converted {r.ppl:.3f} at active "
                   f"fraction {r.mean_active:.3f} ({time.perf_counter() - t0:.1f}s)")


def _calibrate(run: _Run) -> None:
    """--calibrate: train the routers (and experts), copy trained experts into the tensors, evaluate."""
    tc, opts, model = run.tc, run.opts, run.model
    if tc is None:
        return
    if tc.control and not run.router_bias:
        raise DSMoEError("target control (--control) shifts router biases: it needs --router-init fit")
    target = "" if tc.target_active is None else (
        f" above {tc.target_active:g}" if tc.target_start is None else
        f" above a target annealed {tc.target_start:g} -> {tc.target_active:g} over {tc.anneal:.0%} of the steps")
    _log(opts, f"calibrating: {tc.steps} steps x {tc.batch} x {opts.seq_len} tokens "
               f"({'routers' if tc.train_experts == 'none' else f'routers and experts ({tc.train_experts})'}; "
               f"{'KL to dense logits' if tc.distill else 'cross-entropy'} + {tc.sparsity_weight:g} x sparsity"
               f"{target}{'; per-layer bias control' if tc.control else ''})")
    log = train(model, run.train_chunks, tc, progress=opts.progress)
    run.report["training"] = {"steps": tc.steps, "batch": tc.batch, "lr": tc.lr, "sparsity_weight": tc.sparsity_weight,
                              "target_active": tc.target_active, "target_start": tc.target_start,
                              "anneal": tc.anneal, "control": tc.control, "distill": tc.distill,
                              "train_experts": tc.train_experts, "expert_lr": tc.expert_lr,
                              "seconds": log.seconds, "cpu_seconds": log.cpu_seconds, "threads": log.threads,
                              "steps_done": len(log.steps), "time_budget": tc.time_budget,
                              "task_loss": log.task_loss, "sparsity": log.sparsity, "target": log.target}
    if tc.train_experts != "none":
        for i, m in enumerate(model.mlps):
            for proj in EXPERT_SETS[tc.train_experts]:
                name = f"model.layers.{i}.mlp.{proj}.weight"
                run.tensors[name] = getattr(m, proj).weight.detach().to(run.tensors[name].dtype).clone()
    if run.eval_chunks is not None:
        r = evaluate(model, run.eval_chunks)
        run.report["calibrated"] = {"ppl": r.ppl, "active": r.active, "mean_active": r.mean_active}
        _log(opts, f"after calibration: perplexity {r.ppl:.3f} at active fraction {r.mean_active:.3f} "
                   f"({log.seconds:.0f}s of training)")


def _tradeoff(run: _Run, routers: dict[str, torch.Tensor]) -> None:
    """The trade-off curve: one bias shift per layer to each target active fraction (on the fit text);
    the model gets `routers` back afterwards."""
    opts, model, eval_chunks = run.opts, run.model, run.eval_chunks
    if not opts.tradeoff or eval_chunks is None:
        return
    if not run.router_bias:
        _log(opts, "--tradeoff needs router biases (--router-init fit); skipped")
        return
    resid_sparse: list = []
    inputs_sparse = collect_mlp_inputs(model, run.fit_chunks if run.fit_chunks is not None else eval_chunks,
                                       dense=False, residual_norms=resid_sparse)
    curve = []
    for f in opts.tradeoff:
        if opts.allocation == "global":
            rebias(model, inputs_sparse, allocate(model, inputs_sparse, resid_sparse, f))
        else:
            rebias(model, inputs_sparse, f)
        r = evaluate(model, eval_chunks)
        curve.append({"target": f, "ppl": r.ppl, "mean_active": r.mean_active, "active": r.active})
        _log(opts, f"trade-off: target {f:.2f} -> active {r.mean_active:.3f}, perplexity {r.ppl:.3f}")
    run.report["tradeoff"] = curve
    model.load_tensors({**run.tensors, **routers})


def _write(run: _Run, routers: dict[str, torch.Tensor], t_start: float) -> dict:
    """Write OUT: the folder, the tokenizer files, and with a held-out evaluation the report."""
    opts, report, config, out = run.opts, run.report, run.config, run.out
    config["dsmoe_conversion"] = {
        "tool": f"dsmoe_export.convert {__version__}", "source": Path(str(run.src)).name,
        "router_init": run.router_init, "regroup": run.regroup, "seed": opts.seed,
        **({"target_active": opts.target_active, "allocation": opts.allocation} if run.router_init == "fit" else {}),
        **({"calibration_steps": report["training"]["steps_done"]} if "training" in report else {}),
        "notes": run.dense.notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_folder(out, config, {**run.tensors, **routers}, max_shard_bytes=MAX_SHARD_BYTES)
    report["tokenizer_files"] = run.dense.copy_files(out)
    report["seconds"] = time.perf_counter() - t_start
    if "dense" in report:
        write_report(out, report)
    _log(opts, f"wrote {out} in {report['seconds']:.0f}s")
    return report


def dense_baseline(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """The fair reference for a calibration that trains FFN weights: the dense model's same FFN
    weights fine-tuned on the same text (cross-entropy, same steps, batch, learning rate and seed),
    evaluated on the same held-out windows. Writes OUT/baseline.json; returns the report."""
    tc = opts.train
    if opts.calibrate is None or tc is None or tc.train_experts == "none":
        raise DSMoEError("--dense-baseline needs --calibrate TEXT and --train-experts")
    if opts.eval_text is None:
        raise DSMoEError("--dense-baseline needs --eval-text (held-out text)")
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    dense = load_dense(src)
    model = build_model(dense.config, dense.tensors, sparse=False)
    tok = lambda path: tokenize_text(Path(path).read_text(encoding="utf-8"), dense.tokenizer, dense.cfg.vocab_size)
    train_chunks = chunk(tok(opts.calibrate), opts.seq_len)
    eval_chunks = chunk(tok(opts.eval_text), opts.seq_len, max(1, opts.eval_tokens // opts.seq_len))
    report: dict = {"source": str(src), "seed": opts.seed, "seq_len": opts.seq_len, "eval_tokens": int(eval_chunks.numel())}
    report["dense"] = {"ppl": evaluate(model, eval_chunks, dense=True).ppl}
    _log(opts, f"held-out perplexity of the dense model: {report['dense']['ppl']:.3f}")
    log = train(model, train_chunks, tc, progress=opts.progress, dense=True)
    report["finetuned_dense"] = {"ppl": evaluate(model, eval_chunks, dense=True).ppl}
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
