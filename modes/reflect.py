"""`reflect`: draft → critique → `<refine>` edit → refined image, up to `rounds` times."""

from avr.protocol import Actor, Episode, Mode
from avr.registry import register_mode
from avr.sequence import ImageRole


@register_mode("reflect")
class ReflectMode(Mode):
    """Reason–Reflect–Refine: stop as soon as a critique says the image is right."""

    cost = 2

    def __init__(self, rounds: int = 2) -> None:
        if rounds < 1:
            raise ValueError(f"reflect needs at least one round, got {rounds}")
        super().__init__(rounds=rounds)

    def draft(self, actor: Actor, episode: Episode) -> None:
        """A first attempt, to be critiqued."""
        actor.draft(episode, ImageRole.DRAFT)
