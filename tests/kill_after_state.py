"""``python tests/kill_after_state.py N -opt <file> ...``: ``wbsr-train`` that dies by SIGKILL right after it has saved
the training state of iteration N, a crash at a known point for the interrupted-run test (instead of a parent that
polls for the file and kills the process whenever it sees it, which a loaded machine can make too early or late)."""
import os
import signal
import sys

from wbsr_models.runners import train_main
from wbsr_models.wbsr_model import WBSRModel

KILL_AFTER = int(sys.argv.pop(1))
save_training_state = WBSRModel.save_training_state


def save_then_die(self, epoch, current_iter):
    save_training_state(self, epoch, current_iter)
    if current_iter == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


WBSRModel.save_training_state = save_then_die

if __name__ == '__main__':
    sys.exit(train_main())
