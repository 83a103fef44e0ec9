"""`python -m launcher` and `accelerate launch -m launcher` both land here."""
import sys

if __name__ == "__main__":
    try:
        from launcher.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the first modules import: as main() says it (training/stop.py INTERRUPTED)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
