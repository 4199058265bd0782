import json
from pathlib import Path

import numpy as np
import pytest

from avr.research.claims import Roles, load, main, measure

TAGS = ["single_object", "two_object", "counting", "position"] * 30
LEVELS = ["simple", "medium", "medium", "complex"] * 30


def _metrics(path, runs, prompts=None):
    prompts = prompts or [f"prompt {i}" for i in range(len(TAGS))]
    body = {
        "runs": {
            f"{model}/{mode}": {
                "model": model,
                "mode": mode,
                "correct": list(map(int, correct)),
                "per_prompt": {"nfe": nfe},
            }
            for (model, mode), (correct, nfe) in runs.items()
        },
        "prompt_list": {"prompt": prompts, "tag": TAGS, "level": LEVELS},
    }
    path.write_text(json.dumps(body))
    return path


def _correct(rate_by_level, seed):
    rng = np.random.default_rng(seed)
    return [rng.random() < rate_by_level.get(level, 0.0) for level in LEVELS]


def test_claims_are_paired_comparisons_with_verdicts_that_follow_the_interval(tmp_path):
    low = {"simple": 0.5, "medium": 0.1}
    sft = _metrics(
        tmp_path / "sft.json",
        {
            ("sft", "direct"): (_correct(low, 0), 10.0),
            ("sft", "direct*2"): (_correct(low, 1), 20.0),
            ("sft", "reflect"): (_correct({"simple": 0.5, "medium": 0.8}, 2), 20.0),
            ("sft", "plan"): ([0] * len(TAGS), 20.0),
            ("sft", "adaptive"): (_correct(low, 0), 15.0),  # the same outcomes as direct
        },
    )
    rl = _metrics(
        tmp_path / "rl.json",
        {
            ("rl", "adaptive"): (_correct(low, 0), 10.0),
            ("rl-no-penalty", "adaptive"): (_correct(low, 0), 18.0),
        },
    )
    table = {(c.claim, c.measured_as): c for c in measure(load([sft, rl]))}
    reflect = table["reflect helps medium prompts", "reflect − direct, medium prompts (SFT)"]
    assert reflect.verdict == "confirmed" and "n = 60" in reflect.numbers
    matched = next(c for (claim, m), c in table.items() if "direct*2" in m)
    assert matched.verdict == "confirmed"
    same = table["adaptive beats direct", "after SFT: adaptive − direct, all prompts"]
    assert same.verdict == "not resolvable at this size" and "+0.0 points" in same.numbers
    complex_ = table["plan helps complex prompts", "plan − reflect, complex prompts (SFT)"]
    assert complex_.verdict == "not resolvable at this size (both 0%)"
    worse = table["plan helps complex prompts", "plan − direct, complex prompts (SFT)"]
    assert worse.verdict.startswith("not resolvable")  # direct is 0% on complex too
    (penalty,) = [c for c in table.values() if c.claim.startswith("the complexity penalty")]
    assert penalty.verdict == "confirmed" and "NFE 10.0 vs 18.0" in penalty.numbers
    assert table["RL improves on SFT", "RL − SFT, direct"].verdict == "not measured"
    stepwise = next(c for c in table.values() if c.claim == "step-wise rewards help")
    assert stepwise.verdict == "not measured" and "rl-no-stepwise/adaptive" in stepwise.numbers


def test_a_worse_arm_is_refuted_and_a_saving_that_costs_accuracy_is_said(tmp_path):
    good, bad = _correct({"simple": 0.9, "medium": 0.9}, 3), [0] * len(TAGS)
    path = _metrics(
        tmp_path / "m.json",
        {
            ("sft", "direct"): (good, 10.0),
            ("sft", "adaptive"): (bad, 10.0),
            ("rl", "adaptive"): (bad, 10.0),
            ("rl-no-penalty", "adaptive"): (good, 20.0),
        },
    )
    table = measure(load([path]), Roles())
    assert table[0].verdict == "refuted"
    (penalty,) = [c for c in table if c.claim.startswith("the complexity penalty")]
    assert penalty.verdict == "saves compute at a cost in accuracy"


def test_evaluations_on_other_prompts_are_refused_naming_the_file(tmp_path, capsys):
    a = _metrics(tmp_path / "a.json", {("sft", "direct"): ([1] * len(TAGS), 10.0)})
    other = [f"prompt {i}" for i in range(len(TAGS))]
    other[7] = "something else"
    b = _metrics(tmp_path / "b.json", {("rl", "direct"): ([1] * len(TAGS), 10.0)}, other)
    with pytest.raises(ValueError, match=r"b\.json: not the prompts of .*a\.json \(prompt 7"):
        load([a, b])
    assert main([str(a), str(b)]) == 2
    assert "prompt 7" in capsys.readouterr().err
    assert main([str(a), "-o", str(tmp_path / "claims.md")]) == 0
    assert "| claim | measured as | verdict | numbers |" in (tmp_path / "claims.md").read_text()
    capsys.readouterr()
    assert main([str(a), "--json", "-"]) == 0  # the JSON alone on stdout, no file named "-"
    assert json.loads(capsys.readouterr().out)[0]["claim"]
    assert main([str(a), "-o", "-"]) == 0 and not (Path.cwd() / "-").exists()


def test_the_critic_claim_reads_the_reflect_runs_critique_agreement(tmp_path):
    path = _metrics(tmp_path / "m.json", {("sft", "reflect"): ([1] * len(TAGS), 20.0)})
    body = json.loads(path.read_text())
    critique = {"critiques": 200, "agreement": 0.5, "balanced_accuracy": 0.5,
                "false_alarm_rate": 1.0, "miss_rate": 0.0}  # fmt: skip
    body["runs"]["sft/reflect"]["understanding"] = {"critique": critique}
    path.write_text(json.dumps(body))
    claims = {c.measured_as: c for c in measure(load([path]))}
    critic = claims["critique agreement of `sft/reflect` rollouts"]
    assert critic.verdict == "refuted" and critic.numbers.startswith("100 of 200 (50.0%")
    assert claims["critique agreement of `rl/reflect` rollouts"].verdict == "not measured"
    critique.update(agreement=0.99, critiques=1000)
    path.write_text(json.dumps(body))
    critic = {c.measured_as: c for c in measure(load([path]))}[
        "critique agreement of `sft/reflect` rollouts"
    ]
    assert critic.verdict == "confirmed"
