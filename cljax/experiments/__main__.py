"""``python -m cljax.experiments``: the same command line as ``cljax-experiments``."""

from cljax.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
