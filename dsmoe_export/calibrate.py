"""Calibration of a converted DSMoE model: text, perplexity, router fitting, neuron regrouping, training.

Used by `python -m dsmoe_export.convert` (docs/conversion.md). Everything runs on the CPU in float32
with the project's PyTorch reference (`modeling.DSMoEForCausalLM`); randomness comes from explicit
seeded generators, so a run is reproducible for a given seed and thread count.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .modeling import DSMoEForCausalLM, DSMoEMLP


# ----------------------------------------------------------------------------------------- text

def tokenize_text(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token ids of `text`: the model's tokenizer, or UTF-8 bytes when it has none
    (tiny test models without a tokenizer; needs vocab_size >= 256)."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(f"the model folder has no tokenizer and vocab_size {vocab_size} < 256 "
                             "(byte-level fallback impossible)")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def chunk(ids: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping [num_chunks, seq_len] windows (the tail is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text too short: {ids.numel()} tokens < sequence length {seq_len}")
    if max_chunks is not None and n > max_chunks:
        # evenly spread over the text rather than only its beginning
        idx = torch.linspace(0, n - 1, max_chunks).round().long()
        return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in idx.tolist()])
    return ids[: n * seq_len].view(n, seq_len)


# ------------------------------------------------------------------------------------ forward

def forward(model: DSMoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    logits, _ = model(ids, torch.ones_like(ids), torch.arange(s).expand(b, s), model.empty_past(b))
    return logits


@contextlib.contextmanager
def dense_mode(model: DSMoEForCausalLM):
    """Run the same weights with dense FFNs (routers ignored): the teacher / the dense baseline."""
    saved = [m.moe for m in model.mlps]
    for m in model.mlps:
        m.moe = None
    try:
        yield model
    finally:
        for m, moe in zip(model.mlps, saved):
            m.moe = moe


@dataclass
class EvalResult:
    ppl: float
    active: list[float] = field(default_factory=list)  # per layer, mean over tokens and blocks

    @property
    def mean_active(self) -> float:
        return sum(self.active) / len(self.active) if self.active else 1.0


@torch.no_grad()
def evaluate(model: DSMoEForCausalLM, chunks: torch.Tensor, *, batch: int = 8, dense: bool = False,
             desc: str | None = None) -> EvalResult:
    """Perplexity (next-token, every position of every chunk) and per-layer FFN active fraction."""
    model.eval()
    nll, count = 0.0, 0
    sums = [0.0] * len(model.mlps)
    ctx = dense_mode(model) if dense else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(chunks), batch):
            ids = chunks[i:i + batch]
            logits = forward(model, ids)
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
            if not dense:
                for j, m in enumerate(model.mlps):
                    sums[j] += m.last_active.float().mean().item() * len(ids)
    active = [] if dense else [s / len(chunks) for s in sums]
    return EvalResult(ppl=math.exp(nll / count), active=active)


@torch.no_grad()
def collect_mlp_inputs(model: DSMoEForCausalLM, chunks: torch.Tensor, *, batch: int = 8,
                       dense: bool = True, residual_norms: list | None = None) -> list[torch.Tensor]:
    """Per layer, the FFN inputs [tokens, d] (the post-attention RMSNorm outputs) on `chunks`;
    with a list `residual_norms`, also appends per layer the residual stream's norm [tokens]."""
    store: list[list[torch.Tensor]] = [[] for _ in model.mlps]
    norms: list[list[torch.Tensor]] = [[] for _ in model.mlps]
    hooks = [m.register_forward_pre_hook(lambda mod, args, j=j: store[j].append(args[0].flatten(0, -2).clone()))
             for j, m in enumerate(model.mlps)]
    if residual_norms is not None:
        hooks += [layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, j=j: norms[j].append(args[0].flatten(0, -2).norm(dim=-1)))
            for j, layer in enumerate(model.model.layers)]
    model.eval()
    try:
        with dense_mode(model) if dense else contextlib.nullcontext():
            for i in range(0, len(chunks), batch):
                forward(model, chunks[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    if residual_norms is not None:
        residual_norms.extend(torch.cat(x) for x in norms)
    return [torch.cat(s) for s in store]


# ------------------------------------------------------------------------- block contributions

def neuron_activations(mlp: DSMoEMLP, h: torch.Tensor) -> torch.Tensor:
    """act(h W_gate) * (h W_up): [tokens, D]."""
    return mlp.act(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)


def block_norms(mlp: DSMoEMLP, h: torch.Tensor, n: int, *, rows: int = 4096) -> torch.Tensor:
    """||o_i(h)|| per token and block: [tokens, n] (the output each block adds to the residual)."""
    out = []
    V = mlp.down_proj.weight  # [d, D]
    B = V.shape[1] // n
    for s in range(0, len(h), rows):
        a = neuron_activations(mlp, h[s:s + rows])
        out.append(torch.stack([(a[:, i * B:(i + 1) * B] @ V[:, i * B:(i + 1) * B].T).norm(dim=-1)
                                for i in range(n)], dim=-1))
    return torch.cat(out)


# ------------------------------------------------------------------------------- regrouping

def coactivation_groups(mlp: DSMoEMLP, h: torch.Tensor, n: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """A permutation of the D neurons that puts neurons contributing together in the same block.

    Each neuron j is described by its contribution |a_j(t)| * ||V[:, j]|| over the calibration
    tokens t, normalised to unit length; balanced spherical k-means (n clusters of exactly D/n,
    greedy capacity-constrained assignment) groups neurons with similar firing patterns, as
    MoEfication does with co-activation. Returns `perm` [D]: new neuron i is old neuron perm[i]."""
    with torch.no_grad():
        a = neuron_activations(mlp, h)
        feats = (a.abs() * mlp.down_proj.weight.norm(dim=0)).T.double()  # [D, T]
        feats = feats - feats.mean(dim=1, keepdim=True)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
        D = feats.shape[0]
        cap = D // n
        g = torch.Generator().manual_seed(seed)
        centroids = feats[torch.randperm(D, generator=g)[:n]]
        for _ in range(iters):
            sim = feats @ centroids.T                          # [D, n]
            order = torch.argsort(sim.flatten(), descending=True).tolist()
            owner = [-1] * D
            fill = [0] * n
            left = D
            for flat in order:
                j, c = divmod(flat, n)
                if owner[j] >= 0 or fill[c] >= cap:
                    continue
                owner[j] = c
                fill[c] += 1
                left -= 1
                if left == 0:
                    break
            assign = torch.tensor(owner)
            new = torch.stack([feats[assign == c].mean(0) for c in range(n)])
            new = new / new.norm(dim=1, keepdim=True).clamp(min=1e-12)
            if torch.allclose(new, centroids):
                break
            centroids = new
        return torch.cat([torch.nonzero(assign == c).flatten() for c in range(n)])


def permute_ffn(tensors: dict[str, torch.Tensor], layer: int, perm: torch.Tensor) -> None:
    """Reorder the intermediate dimension of one FFN (gate/up rows, down columns): the dense FFN is unchanged."""
    p = f"model.layers.{layer}.mlp."
    tensors[p + "gate_proj.weight"] = tensors[p + "gate_proj.weight"][perm].contiguous()
    tensors[p + "up_proj.weight"] = tensors[p + "up_proj.weight"][perm].contiguous()
    tensors[p + "down_proj.weight"] = tensors[p + "down_proj.weight"][:, perm].contiguous()


# ----------------------------------------------------------------------------- router fitting

LOGIT_SCALE = 4.0  # router logits are scaled to about this spread: sharp enough, still trainable


def fit_router(mlp: DSMoEMLP, h: torch.Tensor, n: int, target_active: float, threshold: float,
               *, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (weight [n, d], bias [n]) that predicts each block's contribution.

    Least squares (ridge) from the FFN input h to log ||o_i(h)|| for every block i, then one
    per-layer cut-off chosen so that a fraction `target_active` of the (token, block) pairs of the
    calibration tokens is predicted above it: a token keeps the blocks predicted to add the most to
    its residual stream. Logit = scale * (prediction - cut-off) + logit(tau), so that the block is
    active (sigmoid > tau) exactly when its prediction is above the cut-off."""
    with torch.no_grad():
        y = block_norms(mlp, h, n).double().clamp(min=1e-8).log()      # [T, n]
        X = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], dim=1)
        A = X.T @ X
        A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=torch.float64)
        W = torch.linalg.solve(A, X.T @ y)                               # [d + 1, n]
        pred = X @ W
        return _bias_for(W, pred, target_active, threshold)


def _bias_for(W: torch.Tensor, pred: torch.Tensor, target_active: float, threshold: float):
    if target_active >= 1.0:
        cut = pred.min() - 1.0
    elif target_active <= 0.0:
        cut = pred.max() + 1.0
    else:
        cut = torch.quantile(pred.flatten().float(), 1.0 - target_active).double()
    scale = LOGIT_SCALE / pred.std().clamp(min=1e-6)
    tau = min(max(threshold, 1e-6), 1 - 1e-6)
    weight = (scale * W[:-1].T).float()
    bias = (scale * (W[-1] - cut) + math.log(tau / (1 - tau))).float()
    return weight, bias


def rebias(model: DSMoEForCausalLM, inputs: list[torch.Tensor], target_active: float | list[float]) -> None:
    """Shift each layer's router bias (one offset per layer) so that the layer's active fraction on
    `inputs` is `target_active`: the per-layer threshold knob, for fitted or trained routers."""
    targets = target_active if isinstance(target_active, list) else [target_active] * len(model.mlps)
    with torch.no_grad():
        for m, h, f in zip(model.mlps, inputs, targets):
            logits = F.linear(h, m.router.weight, m.router.bias)
            tau = min(max(m.moe.threshold, 1e-6), 1 - 1e-6)
            z = math.log(tau / (1 - tau))
            if f >= 1.0:
                shift = z - logits.min().item() + 1.0
            elif f <= 0.0:
                shift = z - logits.max().item() - 1.0
            else:
                shift = z - torch.quantile(logits.flatten(), 1.0 - f).item()
            m.router.bias += shift


@torch.no_grad()
def allocate(model: DSMoEForCausalLM, inputs: list[torch.Tensor], residual_norms: list[torch.Tensor],
             target_active: float, *, grid: int = 16, tokens: int = 2048) -> list[float]:
    """Per-layer active fractions averaging `target_active` that lose the least.

    For each layer and each fraction k/grid, the routers (shifted to that fraction) drop some
    blocks; the loss is the mean of ||dropped output||^2 / ||residual stream||^2 over calibration
    tokens. Greedy marginal allocation (largest loss reduction per step first) then spends the
    budget of active blocks where dropping them would hurt most."""
    L = len(model.mlps)
    err = torch.zeros(L, grid + 1)
    for j, (m, h, r) in enumerate(zip(model.mlps, inputs, residual_norms)):
        h, r = h[:tokens], r[:tokens]
        n = m.moe.num_experts
        B = m.down_proj.weight.shape[1] // n
        a = neuron_activations(m, h)
        V = m.down_proj.weight
        o = torch.stack([a[:, i * B:(i + 1) * B] @ V[:, i * B:(i + 1) * B].T for i in range(n)], dim=1)  # [T, n, d]
        logits = F.linear(h, m.router.weight, m.router.bias)
        for k in range(grid + 1):
            f = k / grid
            if f >= 1.0:
                keep = torch.ones_like(logits, dtype=torch.bool)
            elif f <= 0.0:
                keep = torch.zeros_like(logits, dtype=torch.bool)
            else:
                keep = logits > torch.quantile(logits.flatten(), 1.0 - f)
            dropped = (o * (~keep).unsqueeze(-1).to(o.dtype)).sum(1)
            err[j, k] = (dropped.norm(dim=-1).square() / r.square().clamp(min=1e-12)).mean()
    level = [0] * L
    budget = round(target_active * grid * L)
    for _ in range(budget):
        gains = [err[j, level[j]] - err[j, level[j] + 1] if level[j] < grid else -math.inf for j in range(L)]
        best = max(range(L), key=lambda j: gains[j])
        level[best] += 1
    return [lv / grid for lv in level]


# ---------------------------------------------------------------------------------- training

EXPERT_SETS = {"none": (), "gate_up": ("gate_proj", "up_proj"), "all": ("gate_proj", "up_proj", "down_proj")}


@dataclass
class TrainConfig:
    steps: int = 200
    batch: int = 4
    lr: float = 1e-3
    sparsity_weight: float = 1.0
    target_active: float | None = None   # penalise only the active fraction above this
    target_start: float | None = None    # anneal the target linearly from this to target_active ...
    anneal: float = 0.5                  # ... over this share of the steps (then hold it)
    # Per-layer targets (e.g. the global allocation at target_start and at target_active): with
    # `control`, each layer is held at its own target, interpolated like the mean target.
    layer_targets: tuple[list[float], list[float]] | None = None
    control: bool | None = False         # after each step, shift every router bias towards its target
                                         # (the converter's default None: on when the routers have biases)
    control_rate: float = 0.2            # share of the measured bias error corrected per step
    # Wall-clock cap on the training loop (seconds): training stops after the step that reaches it,
    # and the annealing follows whichever is further along, the steps or the time (so that a slowed
    # run still reaches its final target and holds it for the last part of the budget).
    time_budget: float | None = None
    distill: bool = True                 # KL to the dense logits (else next-token cross-entropy)
    train_experts: str = "none"          # FFN weights trained too: none | gate_up | all (EXPERT_SETS)
    expert_lr: float = 2e-4
    seed: int = 0

    def __post_init__(self):
        if self.train_experts is True or self.train_experts is False:  # older callers passed a bool
            self.train_experts = "all" if self.train_experts else "none"
        if self.train_experts not in EXPERT_SETS:
            raise ValueError(f"train_experts: expected one of {', '.join(EXPERT_SETS)}, got {self.train_experts!r}")
        if self.target_start is not None and self.target_active is None:
            raise ValueError("target_start needs target_active (the annealed target's end point)")

    def _progress(self, step: int, elapsed: float = 0.0) -> float:
        t = step / max(1, round(self.anneal * self.steps))
        if self.time_budget:
            t = max(t, elapsed / max(1e-9, self.anneal * self.time_budget))
        return min(1.0, t)

    def target_at(self, step: int, elapsed: float = 0.0) -> float | None:
        """The sparsity target at `step` (0-based; `elapsed` seconds into training): target_start
        annealed linearly to target_active."""
        if self.target_active is None or self.target_start is None:
            return self.target_active
        return self.target_start + self._progress(step, elapsed) * (self.target_active - self.target_start)

    def layer_targets_at(self, step: int, layers: int, elapsed: float = 0.0) -> list[float] | None:
        """Per-layer targets at `step`: `layer_targets` interpolated (start -> end), else the mean target."""
        if self.layer_targets is not None:
            a, b = self.layer_targets
            if self.target_start is None:
                return list(b)
            t = self._progress(step, elapsed)
            return [x + t * (y - x) for x, y in zip(a, b)]
        mean = self.target_at(step, elapsed)
        return None if mean is None else [mean] * layers


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    target: list[float | None] = field(default_factory=list)
    seconds: float = 0.0                  # wall time of the training loop
    cpu_seconds: float = 0.0              # CPU time of this process over it (all threads)
    threads: int = 0
    stopped_early: bool = False           # the time budget ended training before `steps`


def train(model: DSMoEForCausalLM, chunks: torch.Tensor, cfg: TrainConfig, *, progress: bool = True,
          dense: bool = False) -> TrainLog:
    """Train the routers (and optionally the experts) with the straight-through estimator.

    loss = task + sparsity_weight * sparsity, where task is KL(dense || sparse) of the next-token
    distributions (`distill`, the teacher is the same weights with dense FFNs; with
    `train_experts` the teacher is the frozen starting weights) or plain cross-entropy, and
    sparsity is the paper's mean gate over layers, tokens and blocks (its forward value is the
    active fraction with binary weighting), or with `target_active` only its excess over the
    target of the step (annealed from `target_start` when set).

    `dense=True` is the baseline: the same FFN weights (`train_experts`) fine-tuned with dense FFNs
    on next-token cross-entropy (no routers, no sparsity loss; distillation from the starting
    weights would be the identity), same steps, batches and learning rate."""
    from tqdm.auto import tqdm

    if dense and cfg.train_experts == "none":
        raise ValueError("the dense baseline trains the FFN weights: set train_experts")
    g = torch.Generator().manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [] if dense else [{"params": [p for m in model.mlps for p in m.router.parameters()], "lr": cfg.lr}]
    teacher = None
    if cfg.train_experts != "none":
        experts = [getattr(m, proj).weight for m in model.mlps for proj in EXPERT_SETS[cfg.train_experts]]
        groups.append({"params": experts, "lr": cfg.expert_lr})
        if cfg.distill and not dense:
            import copy
            teacher = copy.deepcopy(model)
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    logits_seen: list = [None] * len(model.mlps)
    hooks = []
    if cfg.control and not dense:
        if any(m.router.bias is None for m in model.mlps):
            raise ValueError("target control shifts router biases: the routers need a bias (--router-init fit)")
        hooks = [m.router.register_forward_hook(lambda mod, args, out, j=j: logits_seen.__setitem__(j, out.detach()))
                 for j, m in enumerate(model.mlps)]
    log = TrainLog(threads=torch.get_num_threads())
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(cfg.steps), desc="fine-tuning dense" if dense else "calibrating", unit="step",
               disable=not progress)
    for step in bar:
        ids = chunks[torch.randint(len(chunks), (cfg.batch,), generator=g)]
        elapsed = time.perf_counter() - t0
        if cfg.time_budget is not None and elapsed >= cfg.time_budget:
            log.stopped_early = True
            break
        target = None if dense else cfg.target_at(step, elapsed)
        if cfg.distill and not dense:
            with torch.no_grad():
                t_model = teacher if teacher is not None else model
                t_model.eval()
                with dense_mode(t_model):
                    t_logp = F.log_softmax(forward(t_model, ids), dim=-1)
        model.train()
        with dense_mode(model) if dense else contextlib.nullcontext():
            logits = forward(model, ids)
        if cfg.distill and not dense:
            logp = F.log_softmax(logits, dim=-1)
            task = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
        else:
            task = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = task
        if not dense:
            sp = model.sparsity_loss()
            reg = sp if target is None else F.relu(sp - target)
            loss = task + cfg.sparsity_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hooks:
            _control(model, logits_seen, cfg.layer_targets_at(step, len(model.mlps), elapsed), cfg.control_rate)
        log.steps.append(step)
        log.task_loss.append(task.item())
        log.target.append(target)
        if dense:
            bar.set_postfix(loss=f"{task.item():.4f}")
        else:
            log.sparsity.append(sp.item())
            bar.set_postfix(task=f"{task.item():.4f}", active=f"{sp.item():.3f}",
                            **({} if target is None else {"target": f"{target:.3f}"}))
    for h in hooks:
        h.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.seconds = time.perf_counter() - t0
    log.cpu_seconds = time.process_time() - c0
    return log


@torch.no_grad()
def _control(model: DSMoEForCausalLM, logits: list, targets: list[float], rate: float) -> None:
    """Move each router bias a share `rate` of the way to the shift that would put the layer's
    active fraction on this batch at its target (a damped per-layer threshold controller)."""
    for m, z, f in zip(model.mlps, logits, targets):
        tau = min(max(m.moe.threshold, 1e-6), 1 - 1e-6)
        zt = math.log(tau / (1 - tau))
        f = min(max(f, 0.0), 1.0)
        q = torch.quantile(z.flatten().float(), 1.0 - f).item() if 0.0 < f < 1.0 else None
        if q is None:
            continue
        m.router.bias += rate * (zt - q)
