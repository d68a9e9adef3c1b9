"""`python -m xqtool ...` (also what `accelerate launch -m xqtool ...` runs)."""

from xqtool.cli import main

if __name__ == "__main__":
    main()
