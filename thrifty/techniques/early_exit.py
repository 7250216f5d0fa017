"""DeeR-VLA's dynamic early exit: the criterion, the budgets that set its thresholds, and the `early_exit` technique.

DeeR-VLA (Yue et al., NeurIPS 2024) runs a multi-exit LLM policy layer by layer and stops at the first exit whose
action agrees with the previous exit's. The functions below do not depend on the model; the multi-exit policy
(`thrifty.agents.deer_policy`) and the registered `early_exit` technique for LM planners (`EarlyExit`, at the end;
its head is `thrifty.agents.planner_exits`) both use them:

- `consistency_score(a, b)`: the RMS of the arm-action difference between two consecutive exits, sqrt(mean((a -
  b)^2)) over the arm dimensions (DeeR's "L2" option, which is an RMS, not a norm). The first exit is compared with
  the shared head applied to layer 0 (the embeddings), a pseudo-exit that is never taken.
- the exit rule: exit at the first exit k whose score is <= thresholds[k], else at the last allowed exit (whose
  threshold is +inf).
- the average-compute budget (`target_distribution`, `solve_thresholds`): an exit ratio r sets a geometric target
  distribution over the K allowed exits, p_k = r^k / sum_j r^j for k = 0..K-1 (DeeR writes r^(k+1); the
  normalisation makes the two identical). r < 1 puts more mass on early exits, r = 1 is uniform, r > 1 favours late
  ones. The thresholds are solved greedily exit by exit on a matrix of scores (one column per demonstration step,
  MSDNet's "budgeted batch" solve): at exit k, among the steps not exited yet, the floor(N p_k) lowest scores exit;
  the threshold is the largest of them (-inf when none may exit there); the last threshold is +inf.
  On the data it was solved on, the realised distribution is then the target (floor(N p_k) steps at every exit but
  the last, which takes the rest), up to ties between scores.
- the peak budget is a maximum exit layer: the policy builds and loads only that many layers, and the thresholds are
  solved over the exits it keeps (the last of them always fires).

Example:
    >>> import numpy as np
    >>> [round(p, 3) for p in target_distribution(0.5, 3)]
    [0.571, 0.286, 0.143]
    >>> scores = np.array([[0.1, 0.5, 0.9, 0.3], [0.2, 0.1, 0.4, 0.8]])
    >>> t = solve_thresholds(scores, [0.5, 0.5])
    >>> t.tolist(), exit_indices(scores, t).tolist()
    ([0.3, inf], [0, 1, 1, 0])
    >>> round(float(np.dot(target_distribution(ratio_for_mean_layers(3.0, [2, 4, 6]), 3), [2, 4, 6])), 6)
    3.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from thrifty.techniques.base import DecisionContext, Technique, register


def consistency_score(a, b):
    """RMS of the difference of two arm actions: a, b (..., A) -> (...), tensors or (acting, one step: a few
    numpy operations cost less than torch's per-call overhead) numpy arrays, in their own dtype."""
    if isinstance(a, np.ndarray):
        d = a - b
        return np.sqrt(np.mean(d * d, axis=-1))
    return (a - b).pow(2).mean(-1).sqrt()


def target_distribution(exit_ratio: float, n_exits: int) -> list[float]:
    """p_k proportional to exit_ratio^k over k = 0..n_exits-1 (the first allowed exit is k = 0)."""
    if not exit_ratio > 0 or not np.isfinite(exit_ratio):
        raise ValueError(f"the exit ratio must be a finite number > 0 (r < 1 favours early exits, 1 is uniform, "
                         f"r > 1 favours late ones), got {exit_ratio}")
    if n_exits < 1:
        raise ValueError(f"need at least one exit, got {n_exits}")
    w = np.asarray([float(exit_ratio) ** k for k in range(n_exits)], np.float64)
    return (w / w.sum()).tolist()


def ratio_for_mean_layers(mean_layers: float, exit_layers: Sequence[int]) -> float:
    """The exit ratio whose geometric target has mean depth `mean_layers` (layers run) over `exit_layers`: how the
    random-exit baseline is matched to a depth DeeR realised in closed loop (bisection; the mean grows with r)."""
    exit_layers = list(exit_layers)
    if not exit_layers[0] < mean_layers < exit_layers[-1]:
        raise ValueError(f"a mean depth strictly between the first and the last exit ({exit_layers[0]} and "
                         f"{exit_layers[-1]} layers) is needed, got {mean_layers}")
    lo, hi = -30.0, 30.0  # log r
    for _ in range(200):
        mid = (lo + hi) / 2
        mean = float(np.dot(target_distribution(float(np.exp(mid)), len(exit_layers)), exit_layers))
        lo, hi = (mid, hi) if mean < mean_layers else (lo, mid)
    return float(np.exp((lo + hi) / 2))


def solve_thresholds(scores: np.ndarray, probs: Sequence[float]) -> np.ndarray:
    """Greedy per-exit thresholds that realise `probs` on `scores`.

    scores (K, N): consistency score of each of N steps at each of the K allowed exits (lower = safer to exit).
    probs (K,): the target share of steps exiting at each exit (sums to 1).
    Returns thresholds (K,): the last one +inf, an exit where nobody may exit -inf.
    """
    scores = np.asarray(scores, np.float64)
    probs = np.asarray(probs, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(probs):
        raise ValueError(f"scores must be (K exits, N steps) with K = len(probs) = {len(probs)}, got shape "
                         f"{scores.shape}")
    if scores.shape[1] == 0:
        raise ValueError("no demonstration steps to solve the thresholds on (scores has 0 columns)")
    if np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
        raise ValueError(f"probs must be >= 0 and sum to 1, got {probs.tolist()}")
    k_exits, n = scores.shape
    thresholds = np.full(k_exits, -np.inf)
    thresholds[-1] = np.inf
    remaining = np.ones(n, bool)
    for k in range(k_exits - 1):
        quota = int(np.floor(n * probs[k] + 1e-9))
        if quota == 0 or not remaining.any():
            continue
        left = np.sort(scores[k, remaining])
        thresholds[k] = left[min(quota, len(left)) - 1]
        remaining &= ~(scores[k] <= thresholds[k])
    return thresholds


def exit_indices(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The exit each step takes under `thresholds`: the first k with scores[k] <= thresholds[k] (the last exit
    when none), (K, N) -> (N,) int."""
    scores = np.asarray(scores, np.float64)
    t = np.asarray(thresholds, np.float64)
    if len(t) != scores.shape[0]:
        raise ValueError(f"{len(t)} thresholds for {scores.shape[0]} exits")
    hit = scores <= t[:, None]
    hit[-1] = True
    return hit.argmax(0)


@dataclass(frozen=True)
class ExitBudget:
    """What the user spends, in DeeR's two controls; `resolve` turns it into thresholds over the allowed exits.

    exit_ratio: the average-compute budget (the geometric target above); None for no early exit (every step runs
        to the last allowed exit).
    max_layer: the peak budget: the deepest layer ever run or loaded (an exit layer of the model; None = all).
    """

    exit_ratio: float | None = None
    max_layer: int | None = None

    def __post_init__(self) -> None:
        if self.exit_ratio is not None:
            target_distribution(self.exit_ratio, 1)  # validates it

    def allowed_exits(self, exit_layers: Sequence[int]) -> list[int]:
        """The exit layers (layers run, 1-based) the peak budget keeps; a max layer that is not one of them fails."""
        exit_layers = list(exit_layers)
        if self.max_layer is None:
            return exit_layers
        if self.max_layer not in exit_layers:
            raise ValueError(f"max_layer {self.max_layer} is not an exit layer of this model; choose one of "
                             f"{exit_layers} (the model has {exit_layers[-1]} layers, an exit every "
                             f"{exit_layers[0]})")
        return [e for e in exit_layers if e <= self.max_layer]

    def resolve(self, scores: np.ndarray | None, exit_layers: Sequence[int]) -> dict:
        """Thresholds for the allowed exits, with the target and the realised distribution on `scores` (the
        demonstration set's (K_all, N) matrix; only its allowed rows are read)."""
        allowed = self.allowed_exits(exit_layers)
        k = len(allowed)
        if self.exit_ratio is None:
            thresholds = np.full(k, -np.inf)
            thresholds[-1] = np.inf
            return {"thresholds": thresholds.tolist(), "target": [0.0] * (k - 1) + [1.0], "realised": None,
                    "exit_layers": allowed}
        if scores is None:
            raise ValueError("an exit-ratio budget needs the demonstration scores to solve thresholds on")
        scores = np.asarray(scores)[:k]
        probs = target_distribution(self.exit_ratio, k)
        thresholds = solve_thresholds(scores, probs)
        realised = np.bincount(exit_indices(scores, thresholds), minlength=k) / scores.shape[1]
        return {"thresholds": thresholds.tolist(), "target": probs, "realised": realised.tolist(),
                "exit_layers": allowed,
                "target_mean_layers": float(np.dot(probs, allowed)),
                "realised_mean_layers": float(np.dot(realised, allowed))}


# ---------------------------------------------------------------------------------------------- the planner technique
DEEP_KV = ("skip", "propagate")
CRITERIA = ("consistency", "random")
RANDOM_STREAM = 0x5EED_E817
"""mixed with each decision's seed for random exits (a stream of its own, apart from other random techniques')"""
SHIPPED_EXIT_HEAD = Path(__file__).resolve().parent.parent / "assets" / "planner_exits"
"""The shipped planner's exit head (`thrifty train exits`; its card says how it was made)."""


@register("early_exit")
@dataclass
class EarlyExit(Technique):
    """DeeR-VLA's dynamic early exit on an LM planner: after each layer from `min_layer` on, a shared exit head
    (`thrifty.agents.planner_exits`) gives the decision token's action distribution; the pass stops at the first
    layer whose distribution is within its threshold (total variation) of the previous layer's, and the action is
    that exit's argmax. Otherwise the last layer runs and the model decodes as usual (so an exit that never fires
    is the full model exactly).

    The KV of deeper layers for tokens whose decision exited at layer d (`deep_kv`): "skip", never computed (those
    layers' caches stay without them, as for tokens pruned at d, so over a kept session later decisions attend at
    the deep layers over the tokens that reached them); or "propagate", each deeper layer's keys and values
    computed from the exit's hidden states by that layer's own projections (CALM, Schuster et al. 2022: about a
    tenth of a layer's FLOPs, counted). The prefix store keeps such caches apart (`composed` names the settings in
    its namespace). A decision's pass is cut for all its new tokens at once.

    Budgets (as in DeeR): `exit_ratio` (average compute: a geometric target distribution over the allowed exits,
    thresholds solved on the head's held-out decisions; the realised shares are in `budget`), `thresholds` (given
    directly, one per allowed exit, the last ignored), `max_layer` (peak compute: no layer deeper than it runs; the
    head always exits there when it is below the last layer). No-op: exit_ratio=None, thresholds=None,
    max_layer=None (nothing loaded, nothing exits).

    The random baseline (criterion="random"): each decision's exit layer is drawn from the budget's target
    distribution (exit_ratio's, or the one of mean depth `mean_layers`), seeded by the decision's seed, and the
    head's argmax there is the action; only the drawn layer calls the head. The same depth, no criterion.
    """

    noop_settings: ClassVar[dict[str, Any]] = {"exit_ratio": None}

    exit_ratio: float | None = 0.3
    """the average-compute budget (r < 1 favours early exits); None: no ratio (thresholds, or max_layer alone)"""
    thresholds: list | None = None
    """explicit thresholds, one per allowed exit (depths min_layer..last allowed; the last is ignored)"""
    max_layer: int | None = None
    """the deepest layer run (1-based, >= min_layer); None = the model's last layer"""
    min_layer: int = 2
    """the first layer that may exit (>= 2: its score compares it with the layer before)"""
    head: str = ""
    """exit-head directory; '' = the shipped planner's (thrifty/assets/planner_exits)"""
    deep_kv: str = "skip"
    """the KV of layers past an exit for the exited decision's tokens: "skip" (never computed) or "propagate"
    (computed from the exit's hidden states by each deeper layer's own key/value projections, CALM)"""
    criterion: str = "consistency"
    """"consistency" (DeeR's: exit when consecutive exits agree) or "random" (the baseline: each decision's exit
    drawn from the budget's target distribution, seeded by the decision's seed; the head gives the action there)"""
    mean_layers: float | None = None
    """random only: draw from the geometric target whose mean depth is this many layers (matched to a depth the
    consistency criterion realised in closed loop) instead of the exit ratio's"""

    def __post_init__(self) -> None:
        if self.exit_ratio is not None:
            target_distribution(self.exit_ratio, 1)  # a clear error for <= 0, NaN, inf
        if self.exit_ratio is not None and self.thresholds is not None:
            raise ValueError("give early_exit either exit_ratio or thresholds, not both (the ratio solves thresholds)")
        if self.thresholds is not None:
            if isinstance(self.thresholds, (str, bytes)) or not all(
                    isinstance(t, (int, float)) and not np.isnan(t) for t in self.thresholds):
                raise ValueError(f"thresholds must be a list of numbers, got {self.thresholds!r}")
            self.thresholds = [float(t) for t in self.thresholds]
        if not isinstance(self.min_layer, int) or self.min_layer < 2:
            raise ValueError(f"min_layer must be an integer >= 2 (the first exit compares its layer's action "
                             f"distribution with the layer before), got {self.min_layer!r}")
        if self.max_layer is not None and (not isinstance(self.max_layer, int) or self.max_layer < self.min_layer):
            raise ValueError(f"max_layer must be an integer >= min_layer ({self.min_layer}), got {self.max_layer!r}")
        if self.deep_kv not in DEEP_KV:
            raise ValueError(f"deep_kv must be one of {DEEP_KV}, got {self.deep_kv!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.criterion == "random" and self.thresholds is not None:
            raise ValueError("random exits draw their exit from a target distribution: give exit_ratio or "
                             "mean_layers, not thresholds")
        if self.mean_layers is not None:
            if self.criterion != "random":
                raise ValueError("mean_layers sets the random baseline's target; the consistency criterion's "
                                 "average budget is exit_ratio")
            if self.exit_ratio is not None:
                raise ValueError("give random exits either exit_ratio or mean_layers (with exit_ratio=None), not "
                                 "both")
        self._bound = None  # (backbone, loaded head, thresholds array, budget dict)
        self._action: str | None = None
        self._report: dict[str, Any] = {}
        self._flops = 0

    @property
    def is_noop(self) -> bool:
        return (self.exit_ratio is None and self.thresholds is None and self.max_layer is None
                and self.mean_layers is None)

    def bind(self, backbone) -> None:
        """Load the head for `backbone` and solve the thresholds (once per backbone); errors say what to change."""
        if self.is_noop or (self._bound is not None and self._bound[0] is backbone):
            return
        from thrifty.agents.planner_exits import load_exit_head

        n_layers = backbone.n_layers
        last = n_layers if self.max_layer is None else self.max_layer
        if last > n_layers:
            raise ValueError(f"max_layer {self.max_layer} is outside this {n_layers}-layer model: choose "
                             f"{self.min_layer}..{n_layers}")
        if self.min_layer > last:
            raise ValueError(f"min_layer {self.min_layer} is past the last allowed layer {last} of this "
                             f"{n_layers}-layer model")
        loaded = load_exit_head(self.head or SHIPPED_EXIT_HEAD, backbone)
        depths = list(range(self.min_layer, last + 1))
        if self.criterion == "random":
            ratio = self.exit_ratio
            if self.mean_layers is not None:
                ratio = ratio_for_mean_layers(self.mean_layers, depths)  # fails outside (depths[0], depths[-1])
            probs = target_distribution(ratio, len(depths)) if ratio is not None else [0.0] * (len(depths) - 1) + [1.0]
            thresholds = np.asarray(probs)  # for random exits: the draw's distribution
            budget = {"exit_layers": depths, "target": probs, "target_mean_layers": float(np.dot(probs, depths))}
        elif self.thresholds is not None:
            if len(self.thresholds) != len(depths):
                raise ValueError(f"{len(self.thresholds)} thresholds given, but the allowed exits are layers "
                                 f"{depths} ({len(depths)} thresholds, the last ignored)")
            thresholds = np.asarray(self.thresholds[:-1] + [np.inf])
            budget = {"exit_layers": depths, "thresholds": thresholds.tolist()}
        else:
            scores = loaded.scores.numpy()[self.min_layer - 2:last - 1]  # rows for depths min_layer..last
            budget = ExitBudget(exit_ratio=self.exit_ratio).resolve(scores, depths)
            thresholds = np.asarray(budget["thresholds"])
        self._bound = (backbone, loaded, thresholds, budget)

    @property
    def budget(self) -> dict:
        """The solved budget: allowed exit layers, thresholds, target and realised shares on the head's data."""
        return {} if self._bound is None else dict(self._bound[3])

    def exit_hook(self, backbone, ctx: DecisionContext):
        self._action, self._report, self._flops = None, {}, 0
        if self.is_noop:
            return None
        from thrifty.agents.planner_exits import consistency

        self.bind(backbone)
        _, loaded, thresholds, budget = self._bound
        head, actions = loaded.head, loaded.head.cfg.actions
        depths = budget["exit_layers"]
        last = depths[-1]
        state: dict[str, Any] = {"prev": None, "scores": []}
        if self.criterion == "random":
            drawn = depths[int(np.random.default_rng([RANDOM_STREAM, ctx.seed]).choice(len(depths), p=thresholds))]

            def random_hook(layer: int, h: torch.Tensor) -> bool:
                if layer + 1 != drawn:  # the session never calls the hook after the last layer: full decodes
                    return False
                probs = torch.softmax(head(h[0, -1]), -1)
                self._flops += head.flops()
                self._action = actions[int(probs.argmax())]
                self._report = {"exit_layer": drawn, "action": self._action}
                return True

            return random_hook

        def hook(layer: int, h: torch.Tensor) -> bool:
            depth = layer + 1
            if depth < self.min_layer - 1:
                return False
            probs = torch.softmax(head(h[0, -1]), -1)
            self._flops += head.flops()
            prev, state["prev"] = state["prev"], probs
            if prev is None:
                return False
            score = float(consistency(probs, prev))
            state["scores"].append(round(score, 5))
            k = depth - self.min_layer
            if depth == last or score <= thresholds[k]:
                self._action = actions[int(probs.argmax())]
                self._report = {"exit_layer": depth, "scores": state["scores"], "action": self._action}
                return True
            return False

        return hook

    def propagates_on_exit(self) -> bool:
        return self.deep_kv == "propagate"

    def exit_text(self) -> str:
        if self._action is None:
            raise RuntimeError("early_exit.exit_text() called, but the last decision did not exit early")
        return self._action

    def own_flops(self) -> int:
        return self._flops

    def report(self) -> dict[str, Any]:
        return {**self._report, "head_flops": self._flops} if self._flops else dict(self._report)

    def __deepcopy__(self, memo):  # a copy (warm-up's twin) shares the loaded head and solved thresholds, read only
        twin = type(self)(**self.settings())
        twin._bound = self._bound
        return twin
