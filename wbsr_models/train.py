"""``python -m wbsr_models.train -opt <file>``: the same as ``wbsr-train`` (usable under ``torchrun``)."""
import sys

from wbsr_models.runners import train_main

if __name__ == '__main__':
    sys.exit(train_main())
