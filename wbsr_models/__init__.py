"""WBSR models: ``WBSRModel`` (training and dynamic inference), the router, baselines and tools.

Importing this package (or any ``wbsr_*`` package) registers all WBSR types in BasicSR.
"""
import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.registry import MODEL_REGISTRY  # noqa: E402

from .router import Router, RoutingOptions, RoutingResult  # noqa: E402
from .wbsr_model import WBSRModel  # noqa: E402

wbsr_hook.register(MODEL_REGISTRY, [WBSRModel])
wbsr_hook.register_all()

__all__ = ['WBSRModel', 'Router', 'RoutingOptions', 'RoutingResult']
