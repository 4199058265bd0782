"""Research instruments, kept apart from the product: the conditioning ladder
(`avr.research.ladder`) and the claims table (`avr.research.claims`). They use the product's
parts (the packer, `SFTModule`, the rollout engine, `avr.evaluate`'s metrics); nothing in the
product imports them."""
