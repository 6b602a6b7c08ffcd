"""Statistics of the generated story corpus (what the README quotes): sentence lengths and how often
"happy" occurs, over `--n` stories drawn as the story task draws them.

    .venv/bin/python bench/story_corpus.py        # writes bench/results/story_corpus.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from mechrl.tasks.stories.grammar import corpus_stats, make_story  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    stats = corpus_stats([make_story(rng) for _ in range(args.n)])
    path = write_result("story_corpus", {"stats": stats, "config": {"n": args.n, "seed": args.seed}}, device="cpu")
    print(stats, "->", path)


if __name__ == "__main__":
    main()
