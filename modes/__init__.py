"""Built-in modes, installed as `avr.modes` and registered through the `avr.modes` entry-point group,
exactly as a user's own package registers its modes."""
