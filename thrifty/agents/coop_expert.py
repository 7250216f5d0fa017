"""The expert team policy: a rule over the shared context only (never the hidden map), for behaviour cloning.

Robot a, on its turn (teammates earlier in the round have already decided, and their decisions are in the text):
1. it holds an open target (its latest `do: goto X`, X not yet reached)  -> keep going: `goto X`;
2. else, some target is reported (an `obs` line names it), not reached and held by no teammate
   -> `goto` the nearest such target, by room distance from its own room (ties: mission order), announcing
   `claim: X` (and `drop: room N` if it was exploring room N, which frees that room for the others);
3. else it holds an open room (its latest `do: explore N`, room N not yet explored) -> keep going: `explore N`;
4. else some room is neither explored nor held by a teammate -> `explore` the nearest one (ties: lowest id),
   announcing `claim: room N`;
5. else `wait`.

Room distance is the Manhattan distance in the room layout (rooms numbered row by row); "open" means not
finished (target not reached / room not explored: `env:` lines). Every quantity it reads is in the rendered
context, so a small model can learn the rule from the text.
"""

from __future__ import annotations

from thrifty.agents.coop_context import CoopContext, TeamState
from thrifty.agents.coop_decision import Decision
from thrifty.envs.coop_grid import Subgoal


def expert_decision(state: TeamState, agent: int) -> Decision:
    """The expert's decision for robot `agent` given the team state the context tells (see module doc)."""
    if not 0 <= agent < state.n_robots:
        raise ValueError(f"agent must be in 0..{state.n_robots - 1}, got {agent}")
    mine = state.open_holding(agent)
    if isinstance(mine, str):
        return Decision(Subgoal("goto", mine))
    here = state.rooms.get(agent, 0)
    free_targets = [t for t in state.targets
                    if t in state.objects and t not in state.reached and state.holder(t, besides=agent) is None]
    if free_targets:
        order = {t: i for i, t in enumerate(state.targets)}
        target = min(free_targets, key=lambda t: (state.room_distance(here, state.objects[t]), order[t]))
        return Decision(Subgoal("goto", target), claim=target, drop=mine)
    if isinstance(mine, int):
        return Decision(Subgoal("explore", mine))
    free_rooms = [r for r in range(state.n_rooms)
                  if r not in state.explored and state.holder(r, besides=agent) is None]
    if free_rooms:
        room = min(free_rooms, key=lambda r: (state.room_distance(here, r), r))
        return Decision(Subgoal("explore", room), claim=room)
    return Decision(Subgoal("wait"))


def expert_decide(context: CoopContext, agent: int) -> str:
    """The expert as a `decide_fn`: reads the rendered context (nothing else) and answers in the planner's
    text format (the continuation of 'rN do:')."""
    return " " + expert_decision(context.state(), agent).text()
