"""Tasks and their data: questions, answers, loaders, checks, the synthetic generator, and who holds what."""
