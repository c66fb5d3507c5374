"""
Summarise py-spy's collapsed stacks (--format raw): the functions with the
most samples, by own time and by inclusive time.

    python -m bench.stacks profile.txt [TOP]
"""

import collections
import sys


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    for title, counter in (("own", own), ("inclusive", inclusive)):
        print(f"-- {title} ({total} samples)")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
