"""Command-line tools built on the core: eval, analyze, compare, bench, serve."""
