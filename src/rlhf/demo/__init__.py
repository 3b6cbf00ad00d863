"""The built-in default: SupportBot (seed 002 Part 5), from synthetic data to a report."""
