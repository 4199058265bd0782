from importlib.metadata import entry_points


def test_builtin_reward_is_registered_through_its_entry_point():
    (ep,) = [e for e in entry_points(group="avr.rewards") if e.name == "compositional"]
    reward_cls = ep.load()
    assert reward_cls.__module__ == "avr.rewards.compositional"
