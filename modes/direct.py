"""`direct`: prompt → image."""

from avr.protocol import Actor, Episode, Mode
from avr.registry import register_mode
from avr.sequence import ImageRole


@register_mode("direct")
class DirectMode(Mode):
    """Draw the answer at once: no plan, no reflection."""

    cost = 1

    def __init__(self) -> None:
        super().__init__(rounds=0)

    def draft(self, actor: Actor, episode: Episode) -> None:
        """The one image is the final one."""
        actor.draft(episode, ImageRole.FINAL)
