"""The planner's context format, shared by training and the agent loop so both see the same tokens.

A context is a list of segments, encoded one by one and concatenated (never re-tokenised as a whole), so the
tokens of a segment never change when later segments are appended: the context is append-only.

    <bos>mission: go to the red ball\n        <- span "mission"
    obs: facing east; ...; wall 3 ahead\n     <- one observation per step
    act: forward\n                            <- "act:" + " forward\n" (the action taken)
    obs: ...\n
    act:                                      <- the decision prompt; the planner generates " left\n"
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACT_PROMPT = "act:"


def mission_segment(mission: str) -> str:
    return f"mission: {mission}\n"


def observation_segment(observation: str) -> str:
    return f"obs: {observation}\n"


def action_segment(action: str) -> str:
    return f" {action}\n"


@dataclass
class Transcript:
    """Mission, observations and the actions taken, in order. `segments()` renders it for the planner."""

    mission: str
    observations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def segments(self) -> list[tuple[str, str]]:
        """(kind, text) pairs; kinds: mission, observation, act_prompt, action. Ends with a decision prompt
        when there is one more observation than actions."""
        out = [("mission", mission_segment(self.mission))]
        for i, obs in enumerate(self.observations):
            out.append(("observation", observation_segment(obs)))
            out.append(("act_prompt", ACT_PROMPT))
            if i < len(self.actions):
                out.append(("action", action_segment(self.actions[i])))
        return out

    def text(self) -> str:
        return "".join(t for _, t in self.segments())
