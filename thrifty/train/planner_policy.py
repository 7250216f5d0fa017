"""The LM planner as a reinforcement-learning policy (issue 19): its distribution over the action words, closed-loop
rollouts through exact prefix reuse that store the behaviour log-probabilities, and the teacher-forced pass that
scores a whole episode at once (`thrifty.train.planner_rl` runs PPO on them).

pi(a | context) = softmax(logits[action tokens] / T) at the decision prompt's last token, each action word being one
token (" left", ...), the token greedy decoding emits first; acting and learning use the same distribution. The
context is append-only, so one forward over an episode's tokens gives the logits (and the value head's input, the
final hidden state) at every decision position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from thrifty.envs.babyai_text import ACTIONS


class PlannerRLError(ValueError):
    """A planner-RL run that cannot start as asked (bad recipe, model directory, or resume)."""


class ValueHead(nn.Module):
    """h [..., d] (the decision token's final hidden state) -> V [...]."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


def action_token_ids(tokenizer) -> torch.Tensor:
    """[A] the token of each action word in ACTIONS order, as the planner emits it (" word", one token; the exit
    head's `planner_exits.action_token_ids`), which must also open the action as the transcript writes it."""
    from thrifty.agents.planner_exits import ExitHeadError
    from thrifty.agents.planner_exits import action_token_ids as single_tokens

    try:
        ids = single_tokens(tokenizer, ACTIONS)
    except ExitHeadError as e:
        raise PlannerRLError(f"{e} (the RL policy is a distribution over one token per action word)") from e
    for a, i in zip(ACTIONS, ids):
        if tokenizer.encode(f" {a}\n", add_special_tokens=False)[0] != i:
            raise PlannerRLError(f"the transcript's action segment ' {a}\\n' does not start with the token {i} "
                                 "the planner emits for it")
    return torch.tensor(ids, dtype=torch.long)


def load_planner_for_rl(model_dir: str | Path):
    """(HF causal LM, tokenizer) from a local planner directory, with clear errors for what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise PlannerRLError(f"no planner at {p} (no config.json): pass a directory written by `thrifty train "
                             "planner` or another local causal LM")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise PlannerRLError(f"{p} has no tokenizer (tokenizer.json / tokenizer_config.json): the planner reads "
                             "text, so its directory must hold the tokenizer it was trained with")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    return model, tokenizer


@dataclass
class Episode:
    """One rollout: the episode's whole token context and, per decision, where it was made and what was taken."""

    level: str
    seed: int
    ids: list[int]
    positions: list[int]
    """index of each decision's prompt token (its logits predict the action token)"""
    actions: list[int]
    logp: list[float]
    """behaviour log-probability of each action taken, stored at acting time"""
    reward: float
    steps: int
    prompt_tokens: list[int] = field(default_factory=list)
    """per decision: the context's length t (the prompt EchoRL's b(t) prices)"""
    reused_tokens: list[int] = field(default_factory=list)
    """per decision: the tokens whose keys and values came from the kept session (t')"""
    obs_spans: list[tuple[int, int]] = field(default_factory=list)
    """per decision: the current observation's span (start, end) in `ids` (where a latent plan is injected)"""
    goal_distance: list[int | None] = field(default_factory=list)
    """`BabyAITextEnv.goal_distance()` before each decision and after the last (steps + 1 entries)"""
    terminated: bool = False
    """the episode ended by the task (success or failure), not by the step limit"""
    old_values: torch.Tensor | None = None
    bc_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def success(self) -> bool:
        return self.reward > 0


def action_log_probs(logits: torch.Tensor, action_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., vocab] -> log pi over the action words [..., A]."""
    return torch.log_softmax(logits[..., action_ids] / temperature, -1)


def _check_plans(backbone) -> None:
    if getattr(backbone, "_embed_mult", None) is not None:
        raise PlannerRLError("latent plans are added to input embeddings, and this model family scales them "
                             "(an embedding multiplier): not supported; train without latent plans")


@torch.no_grad()
def rollout(model, tokenizer, action_ids: torch.Tensor, level: str, seed: int, gen: torch.Generator,
            max_steps: int, temperature: float = 1.0, greedy: bool = False, reuse: bool = True,
            plans=None) -> Episode:
    """Play one episode, sampling each action from pi (argmax with `greedy`), through one kept session (exact
    prefix reuse: each decision runs only the tokens appended since the previous one), or with `reuse=False`
    recomputing the whole context at every decision (the baseline of EchoRL's bandwidth comparison). `plans` (a
    `thrifty.train.latent_plan.PlanEncoder`) adds each observation's latent plan to its first token's embedding,
    computed when the observation arrives and fixed from then on."""
    from thrifty.agents.planner import PlannerContext
    from thrifty.backbones import HFDecoder
    from thrifty.envs.babyai_text import BabyAITextEnv
    from thrifty.runtime import Session
    from thrifty.train.latent_plan import observation_embeddings

    env = BabyAITextEnv(level, max_steps=max_steps)
    obs, info = env.reset(seed=seed)
    ctx = PlannerContext(tokenizer)
    ctx.start(info["mission"])
    backbone = HFDecoder.from_model(model)
    if plans is not None:
        _check_plans(backbone)
    session, fed = Session(backbone), 0
    positions, actions, logps, prompt, reused, spans, deltas = [], [], [], [], [], [], []
    dist = [env.goal_distance()]
    reward, done, steps, terminated = 0.0, False, 0, False
    while not done:
        ctx.add_observation(obs)
        spans.append(ctx.spans["observation"])
        if plans is not None:  # the plan of this observation, from the last k observations' embeddings
            ids_t = torch.tensor(ctx.ids, dtype=torch.long)
            window = spans[-plans.window:]
            deltas.append(plans(observation_embeddings(model, ids_t, window))[1][-1])
        if not reuse:
            session, fed = Session(backbone), 0
        prompt.append(len(ctx.ids))
        reused.append(fed)
        delta = {a - fed: d for (a, _), d in zip(spans, deltas) if a >= fed} if deltas else None
        res = session.extend(ctx.ids[fed:], logits="last", embed_delta=delta)
        fed = len(ctx.ids)
        logp = action_log_probs(res.logits[-1], action_ids, temperature)
        a = int(logp.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1, generator=gen))
        positions.append(fed - 1)
        actions.append(a)
        logps.append(float(logp[a]))
        ctx.add_action(ACTIONS[a])
        obs, reward, terminated, truncated, _ = env.step(a)
        dist.append(env.goal_distance())
        steps += 1
        done = terminated or truncated
    env.close()
    return Episode(level, seed, list(ctx.ids), positions, actions, logps, float(reward), steps, prompt, reused,
                   spans, dist, bool(terminated))


def score_episode(model, value_head: ValueHead, ep: Episode, action_ids: torch.Tensor, temperature: float,
                  plans=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One teacher-forced pass over the episode: (log pi [N, A], V [N], final hidden states [N, d], detached, and
    the latent plans z [N, d_plan] or None) at its N decisions (grad as the caller set it). The value head reads
    the final hidden state, detached. With `plans`, each observation's first token gets its plan as at acting."""
    from thrifty.train.latent_plan import observation_embeddings

    ids = torch.tensor(ep.ids, dtype=torch.long)
    z = None
    if plans is None:
        out = model(input_ids=ids[None], output_hidden_states=True)
    else:
        z, delta = plans(observation_embeddings(model, ids, ep.obs_spans))
        starts = torch.tensor([a for a, _ in ep.obs_spans], dtype=torch.long)
        emb = model.get_input_embeddings()(ids).index_add(0, starts, delta)
        out = model(inputs_embeds=emb[None], output_hidden_states=True)
    pos = torch.tensor(ep.positions, dtype=torch.long)
    logp = action_log_probs(out.logits[0, pos], action_ids, temperature)
    hidden = out.hidden_states[-1][0, pos].detach()
    return logp, value_head(hidden), hidden, z
