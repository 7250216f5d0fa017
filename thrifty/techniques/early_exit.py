"""DeeR-VLA's dynamic early exit: the action-consistency criterion and the budgets that set its thresholds.

DeeR-VLA (Yue et al., NeurIPS 2024) runs a multi-exit LLM policy layer by layer and stops at the first exit whose
action agrees with the previous exit's. This module holds the parts that do not depend on the model, so a policy
(`thrifty.agents.deer_policy`) or a planner can use them:

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

import numpy as np
import torch


def consistency_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS of the difference of two arm actions: a, b (..., A) -> (...)."""
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
