"""`retry`: draft → critique; while the critique says wrong, draw again in a fresh context."""

from avr.protocol import Actor, Episode, Mode
from avr.registry import register_mode
from avr.sequence import ImageRole


@register_mode("retry")
class RetryMode(Mode):
    """The model's own verdict picks among its own tries: each try is laid out as a `reflect`
    trajectory's first draft and critique (the prompt, `<mode:reflect>`, the draft, the critique,
    where the critic reads a draft as it learned to), and a try its critique calls wrong is
    followed by another in a fresh context (`Actor.restart`: the model sees only the prompt again,
    with new noise), up to `tries` drafts. The answer is the first draft its critique accepts,
    else the last one; the trajectory keeps every try (`avr.sequence.tries` splits them).

    Against `reflect`, whose refine edits the draft in context, a try here is as likely to be right
    as a direct answer, and a right draft the critic wrongly rejects is not edited into a wrong
    one. Compute: `tries` × a direct answer at most (NFE in the trajectory's meta); compare with
    `direct*N`, the verifier's pick of N answers, at equal NFE. Inference only: training lays out
    one context at a time, so its tries are taught as reflect trajectories (critique views)."""

    cost = 2
    token = "reflect"
    trainable = False

    def __init__(self, tries: int = 3) -> None:
        if tries < 2:
            raise ValueError(f"retry needs at least two tries, got {tries}")
        super().__init__(rounds=0)
        self.tries = tries

    def run(self, actor: Actor, episode: Episode) -> None:
        """Up to `tries` × (draft → critique), restarting the context after each rejected draft."""
        for k in range(self.tries):
            if k:
                actor.restart(episode)
                actor.announce(episode, self.token)
            self.draft(actor, episode)
            if self.reflect(actor, episode).ok:
                return

    def draft(self, actor: Actor, episode: Episode) -> None:
        """A try, to be critiqued."""
        actor.draft(episode, ImageRole.DRAFT)
