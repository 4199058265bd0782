"""`avr COMMAND [args]`: one console script for the command-line tools, as `litgpt finetune` or
`trl grpo` are. `avr fit experiments/rl.yaml` is `python -m avr.fit experiments/rl.yaml`, and so on
for every command below; each takes the same arguments as its module (`avr evaluate --help`)."""

from __future__ import annotations

import importlib
import sys

#: command → (module, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("avr.fit", "train from a YAML config (SFT or RL) through LightningCLI"),
    "generate": ("avr.generate", "make images with a trained model, every step shown"),
    "evaluate": ("avr.evaluate", "roll out modes on a prompt file and score them"),
    "export": ("avr.export", "turn a training checkpoint into a model folder"),
    "data": ("avr.data.__main__", "build SFT trajectory data"),
    "world": ("avr.world.__main__", "ShapeWorld prompts, renders and scores"),
    "bench": ("avr.bench", "benchmarks (speed and memory, the machine named)"),
    "registry": ("avr.registry", "list the registered modes and rewards"),
    "curves": ("avr.curves", "plot runs' logged curves; does the reward rise?"),
    "claims": ("avr.research.claims", "the papers' claims as paired comparisons over evaluations"),
    "ladder": ("avr.research.ladder", "the conditioning ladder: train a toy rung, judge it"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
        print(f"usage: avr COMMAND [args]\n\ncommands:\n{listing}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command == "fit":
        if argv is None:  # LightningCLI (and DDP's relaunch) read sys.argv: keep `fit` in it
            sys.argv[1:] = ["fit", *rest]
            module.main()
        else:
            module.main(["fit", *rest])
        return 0
    if command == "registry":
        return module.main()
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
