"""Built-in rewards, installed as `avr.rewards` and registered through the `avr.rewards` entry-point
group, exactly as a user's own package registers its rewards."""
