"""WBSR data: the patch difficulty function, the HES patch index and ``HESPairedImageDataset``.

Importing this package (or any ``wbsr_*`` package) registers all WBSR types in BasicSR.
"""
import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.registry import DATASET_REGISTRY  # noqa: E402

from .difficulty import DifficultyProjection, gradient_vectors  # noqa: E402
from .hes_dataset import HESPairedImageDataset, set_train_progress  # noqa: E402
from .patch_index import PatchIndex, load_or_build_index  # noqa: E402

wbsr_hook.register(DATASET_REGISTRY, [HESPairedImageDataset])
wbsr_hook.register_all()

__all__ = ['DifficultyProjection', 'gradient_vectors', 'HESPairedImageDataset', 'set_train_progress', 'PatchIndex',
           'load_or_build_index']
