"""The expert team policy: a rule over the shared context only (never the hidden map), for behaviour cloning.

Robot a, on its turn (teammates earlier in the round have already decided, and their decisions are in the text):
1. it holds an open target (its latest `do: goto X`, X not yet reached)  -> keep going: `goto X`;
2. else, the *free* targets (reported in an `obs` line, not reached, held by no teammate) are matched to the
   *free* robots (those not holding an open target: idle or exploring) in mission order, each target to the
   nearest remaining free robot by room distance (ties: lowest robot id); if a target falls to robot a
   -> `goto` it, announcing `claim: X` (and `drop: room N` if it was exploring room N, which frees that room);
3. else it holds an open room (its latest `do: explore N`, room N not yet explored) -> keep going: `explore N`;
4. else some room is neither explored nor held by a teammate -> `explore` the nearest one (ties: lowest id),
   announcing `claim: room N`;
5. else `wait`.

Room distance is the Manhattan distance in the room layout (rooms numbered row by row); "open" means not
finished (target not reached / room not explored: `env:` lines). Every quantity it reads is in the rendered
context, so a small model can learn the rule from the text; the caller's role line lists its free targets and
free rooms (`TeamState.role_text`), the sets steps 2 and 4 choose from.
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
    free_robots = [a for a in range(state.n_robots) if not isinstance(state.open_holding(a), str)]
    for target in state.free_targets(agent):
        room = state.objects[target]
        nearest = min(free_robots, key=lambda a: (state.room_distance(state.rooms.get(a, 0), room), a))
        if nearest == agent:
            return Decision(Subgoal("goto", target), claim=target, drop=mine)
        free_robots.remove(nearest)
        if not free_robots:
            break
    here = state.rooms.get(agent, 0)
    if isinstance(mine, int):
        return Decision(Subgoal("explore", mine))
    free_rooms = state.free_rooms(agent)
    if free_rooms:
        room = min(free_rooms, key=lambda r: (state.room_distance(here, r), r))
        return Decision(Subgoal("explore", room), claim=room)
    return Decision(Subgoal("wait"))


def expert_decide(context: CoopContext, agent: int) -> str:
    """The expert as a `decide_fn`: reads the rendered context (nothing else) and answers in the planner's
    text format (the continuation of 'rN do:')."""
    return " " + expert_decision(context.state(), agent).text()
