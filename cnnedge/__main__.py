"""`python -m cnnedge` (also what torchrun launches: `torchrun ... -m cnnedge train`)."""

from cnnedge.cli import main

if __name__ == "__main__":
    main()
