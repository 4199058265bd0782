"""Does a model's critic read the image? (docs/self-improvement.md, "Does the critic look at the
image?")

For simple prompts, the teacher's render of each prompt is critiqued in the context a reflect
draft has (the prompt, `<mode:reflect>`, the image), greedy: under its own prompt and under
another prompt's, against the verifier's verdict; and the same prompt's critique of the render
against that of a blank canvas, word for word, with the log-probability the image adds to
"the image matches the prompt.".

    python experiments/probes/critic_reads.py checkpoints/shapeworld-tiny-self
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from avr.backbone import from_pretrained
from avr.data.critique import OK_IMAGE, description, is_verdict_ok, read_canvas
from avr.sequence import image_to_array
from avr.world import Verifier, render, sample_scene, sample_specs


def _session(model, prompt: str, image: Image.Image):
    tok = model.tokenizer
    session = model.session(batch_size=1)
    session.append_tokens([[tok.bos_token_id]])
    session.append_text([prompt])
    session.append_text(["<mode:reflect>"])
    pixels = torch.from_numpy(image_to_array(image, model.config.image_size))
    session.append_image(rearrange(pixels, "h w c -> 1 c h w"))
    return session


def critique(model, prompt: str, image: Image.Image) -> str:
    """The model's greedy critique of `image` under `prompt`."""
    stop = [["</refine>", model.tokenizer.eos_token]]
    return _session(model, prompt, image).sample_text(96, stop=stop, temperature=0.0).text[0]


def logprob(model, prompt: str, image: Image.Image, text: str) -> float:
    """log p(`text` | prompt, `<mode:reflect>`, image)."""
    session, total = _session(model, prompt, image), 0.0
    for token in model.tokenizer.encode(text, add_special_tokens=False):
        total += float(session.last_logits[0].log_softmax(-1)[token])
        session.append_tokens([[token]])
    return total


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported model folder")
    parser.add_argument("--n", type=int, default=60, help="simple prompts")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = from_pretrained(args.model).eval()
    specs = sample_specs(args.n, ["single_object", "two_object", "colors"], seed=args.seed)
    verifier, blank = Verifier(), Image.new("RGB", (64, 64), "white")
    agree = described = same = 0
    gain = []
    for i, spec in enumerate(specs):
        image = render(sample_scene(spec, np.random.default_rng(i)), 64)
        other = specs[(i + 7) % len(specs)]
        for asked in (spec, other):
            text, verdict = critique(model, asked.prompt, image), verifier.verify(image, asked)
            agree += is_verdict_ok(text) == verdict.correct
            described += description(text) == read_canvas(verdict.detections, 64)
        same += critique(model, spec.prompt, image) == critique(model, spec.prompt, blank)
        gain.append(
            logprob(model, spec.prompt, image, OK_IMAGE)
            - logprob(model, spec.prompt, blank, OK_IMAGE)
        )
    n = 2 * len(specs)
    print(f"renders under their own and another prompt: verdict agrees {agree} of {n}")
    print(f"descriptions equal to the verifier's reading: {described} of {n}")
    print(f"right render vs blank canvas: {same} of {len(specs)} critiques the same word for word")
    print(f"log p('{OK_IMAGE}') right render − blank canvas: mean {np.mean(gain):+.2f} nats")


if __name__ == "__main__":
    main()
