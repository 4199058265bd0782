"""`plan`: for each step, `<ins>`/`<des>` → sketch → inspect → refine when needed; the last state
is the final image."""

from avr.protocol import Actor, Episode, Mode
from avr.registry import register_mode
from avr.sequence import ImageRole


@register_mode("plan")
class PlanMode(Mode):
    """Plan → sketch → inspect → refine, step by step (process-driven generation)."""

    cost = 3

    def __init__(self, max_steps: int = 6, rounds: int = 1) -> None:
        super().__init__(rounds=rounds)
        self.max_steps = max_steps

    def run(self, actor: Actor, episode: Episode) -> None:
        """Each step: plan it, sketch it, inspect it, refine it up to `rounds` times."""
        for step in range(self.max_steps):
            if not actor.plan(episode, step):
                break
            self.draft(actor, episode)
            for _ in range(self.rounds):
                if self.reflect(actor, episode).ok:
                    break
                self.refine(actor, episode)
            else:
                if self.rounds:
                    self.reflect(actor, episode)
        self._mark_final(episode)

    def draft(self, actor: Actor, episode: Episode) -> None:
        """A sketch: the canvas after this step."""
        actor.draft(episode, ImageRole.SKETCH)

    def refine(self, actor: Actor, episode: Episode) -> None:
        """Redraw the step's sketch as the inspection asks."""
        actor.refine(episode, ImageRole.SKETCH)

    @staticmethod
    def _mark_final(episode: Episode) -> None:
        images = episode.trajectory.images
        if images:
            images[-1].role = ImageRole.FINAL
