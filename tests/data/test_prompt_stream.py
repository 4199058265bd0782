from collections import Counter

import pytest

from avr.data.prompts import PromptDataModule, PromptStream, stratified_levels
from avr.world import complexity

MIX = {"simple": 0.3, "medium": 0.4, "complex": 0.3}


def test_stratified_batches_hold_the_mix_in_the_same_counts_every_batch():
    assert Counter(stratified_levels(MIX, 8)) == {"simple": 3, "medium": 3, "complex": 2}
    assert Counter(stratified_levels(MIX, 10)) == {"simple": 3, "medium": 4, "complex": 3}
    assert stratified_levels({"medium": 1.0}, 3) == ["medium"] * 3
    stratified, drawn = PromptStream(8, MIX, seed=0, stratified=True), PromptStream(8, MIX, seed=0)
    counts = [Counter(complexity(s).level for s in stratified.batch(b)) for b in range(6)]
    assert all(c == {"simple": 3, "medium": 3, "complex": 2} for c in counts)
    orders = {tuple(complexity(s).level for s in stratified.batch(b)) for b in range(6)}
    assert len(orders) > 1  # shuffled within the batch
    free = [Counter(complexity(s).level for s in drawn.batch(b)) for b in range(6)]
    assert len({tuple(sorted(c.items())) for c in free}) > 1  # drawn per prompt: counts vary
    assert stratified.batch(3) == PromptStream(8, MIX, seed=0, stratified=True).batch(3)


def test_the_data_module_passes_stratified_on():
    module = PromptDataModule(batch_size=8, stratified=True)
    batch = next(iter(module.train_dataloader()))
    assert Counter(complexity(s).level for s in batch) == {"simple": 3, "medium": 3, "complex": 2}
    with pytest.raises(ValueError):
        PromptDataModule(split="nowhere")


def test_a_cycling_stream_is_a_fixed_training_set_visited_in_order():
    module = PromptDataModule(batch_size=4, cycle=3, seed=5)
    stream = iter(module.train_dataloader())
    batches = [next(stream) for _ in range(7)]
    assert batches[3:6] == batches[:3] and batches[6] == batches[0]
    assert batches[0] != batches[1] != batches[2]
    fresh = PromptStream(4, MIX, seed=5)
    assert [fresh.batch(b) for b in range(3)] == batches[
        :3
    ]  # the pass is the stream's first batches
    assert fresh.batch(3) != batches[3]  # without a cycle, batch 3 is new
    module.batches_seen = 4  # a resumed run goes on where the pass was
    assert next(iter(module.train_dataloader())) == batches[1]
    with pytest.raises(ValueError, match="cycle"):
        PromptDataModule(cycle=-1)
