"""WBSR training losses (BDLoss and the GMM of its label distribution), registered in BasicSR's LOSS_REGISTRY.

Importing this package (or any ``wbsr_*`` package) registers all WBSR types in BasicSR.
"""
import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.registry import LOSS_REGISTRY  # noqa: E402

from .bd_loss import BDLoss  # noqa: E402
from .gmm import PixelGMM, detail_component, fit_gmm, fit_gmm_for_options, load_gmm, save_gmm  # noqa: E402

wbsr_hook.register(LOSS_REGISTRY, [BDLoss])
wbsr_hook.register_all()

__all__ = ['BDLoss', 'PixelGMM', 'detail_component', 'fit_gmm', 'fit_gmm_for_options', 'load_gmm', 'save_gmm']
