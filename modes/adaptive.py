"""`adaptive`: emit a mode token after the prompt, then follow that mode."""

from avr.protocol import Actor, Episode, Mode
from avr.registry import MODES, register_mode


@register_mode("adaptive")
class AdaptiveMode(Mode):
    """The policy picks its own mode per prompt among `choices` (registered mode names)."""

    announced = False  # the chosen mode's token is written by `choose`

    def __init__(self, choices: tuple[str, ...] = ("direct", "reflect", "plan")) -> None:
        super().__init__(rounds=0)
        if "adaptive" in choices:
            raise ValueError("adaptive cannot choose itself")
        self.choices = tuple(choices)
        self.modes = {name: MODES.get(name)() for name in self.choices}

    def run(self, actor: Actor, episode: Episode) -> None:
        """Choose (teacher label or sampled mode token), then run the chosen mode."""
        chosen = actor.choose(episode, list(self.choices))
        episode.trajectory.meta["mode"] = chosen
        self.modes[chosen].run(actor, episode)

    def draft(self, actor: Actor, episode: Episode) -> None:
        """Adaptive draws only through the mode it chooses."""
        raise NotImplementedError("adaptive delegates every step to the mode it chooses")
