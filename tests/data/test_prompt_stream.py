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
