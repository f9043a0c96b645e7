"""``python -m wbsr_models.test -opt <file>``: the same as ``wbsr-test``."""
import sys

from wbsr_models.runners import test_main

if __name__ == '__main__':
    sys.exit(test_main())
