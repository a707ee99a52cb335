"""python -m benchmarks.quality: the CPU-scale quality benchmark (see README.md beside this file)."""

from benchmarks.quality.bench import main

if __name__ == "__main__":
    main()
