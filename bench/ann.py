"""ANN benchmark script: ``python bench/ann.py [--quick]`` (same as ``fastface bench ann``)."""

import sys

from fastface._bench.ann import main

if __name__ == "__main__":
    sys.exit(main())
