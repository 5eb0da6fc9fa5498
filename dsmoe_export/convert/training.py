"""Router (and optionally expert) training with the straight-through estimator: the configuration, the
loop, and the per-layer bias controller that holds each layer at its target."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modeling import DSMoEForCausalLM
from .text import dense_mode, forward

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
    opt, teacher = _optimizer(model, cfg, dense)
    logits_seen: list = [None] * len(model.mlps)
    hooks = _control_hooks(model, cfg, dense, logits_seen)
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
        task, sp = _step(model, teacher, opt, ids, cfg, target, dense)
        if hooks:
            _control(model, logits_seen, cfg.layer_targets_at(step, len(model.mlps), elapsed), cfg.control_rate)
        _record(log, bar, step, task, sp, target)
    for h in hooks:
        h.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.seconds = time.perf_counter() - t0
    log.cpu_seconds = time.process_time() - c0
    return log


def _optimizer(model: DSMoEForCausalLM, cfg: TrainConfig, dense: bool):
    """Adam over the routers (not for the dense baseline) and the trained FFN weights, everything
    else frozen; and the distillation teacher when the experts move (a frozen copy, else None)."""
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [] if dense else [{"params": [p for m in model.mlps for p in m.router.parameters()], "lr": cfg.lr}]
    teacher = None
    if cfg.train_experts != "none":
        experts = [getattr(m, proj).weight for m in model.mlps for proj in EXPERT_SETS[cfg.train_experts]]
        groups.append({"params": experts, "lr": cfg.expert_lr})
        if cfg.distill and not dense:
            teacher = copy.deepcopy(model)  # copied while everything is frozen: the teacher stays frozen
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    return torch.optim.Adam(groups), teacher


def _control_hooks(model: DSMoEForCausalLM, cfg: TrainConfig, dense: bool, logits_seen: list) -> list:
    """With `control`: hooks that keep each router's last logits in `logits_seen` (for _control)."""
    if not cfg.control or dense:
        return []
    if any(m.router.bias is None for m in model.mlps):
        raise ValueError("target control shifts router biases: the routers need a bias (--router-init fit)")
    return [m.router.register_forward_hook(lambda mod, args, out, j=j: logits_seen.__setitem__(j, out.detach()))
            for j, m in enumerate(model.mlps)]


def _step(model: DSMoEForCausalLM, teacher, opt, ids: torch.Tensor, cfg: TrainConfig, target: float | None,
          dense: bool):
    """One optimizer step on the batch `ids`; returns (task loss, sparsity loss or None when dense)."""
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
    sp = None
    if not dense:
        sp = model.sparsity_loss()
        reg = sp if target is None else F.relu(sp - target)
        loss = task + cfg.sparsity_weight * reg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return task, sp


def _record(log: TrainLog, bar, step: int, task: torch.Tensor, sp: torch.Tensor | None,
            target: float | None) -> None:
    """The step's log entry and progress-bar line (sp None: the dense baseline)."""
    log.steps.append(step)
    log.task_loss.append(task.item())
    log.target.append(target)
    if sp is None:
        bar.set_postfix(loss=f"{task.item():.4f}")
    else:
        log.sparsity.append(sp.item())
        bar.set_postfix(task=f"{task.item():.4f}", active=f"{sp.item():.3f}",
                        **({} if target is None else {"target": f"{target:.3f}"}))


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
