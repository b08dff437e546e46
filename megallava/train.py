"""``python -m megallava.train`` / ``torchrun -m megallava.train``: see megallava.training.train."""
import sys

from megallava.training.train import main

if __name__ == "__main__":
    sys.exit(main())
