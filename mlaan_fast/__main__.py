import sys

try:
    from mlaan_fast.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still being imported
    print("mlaan-fast: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    raise SystemExit(main())
