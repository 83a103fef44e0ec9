"""`python -m launcher` and `accelerate launch -m launcher` both land here."""
import sys

from launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
