"""``python -m training`` (or ``torchrun ... -m training``): the training job, see :mod:`training.train`."""

import sys

from training.train import main

if __name__ == "__main__":
    sys.exit(main())
