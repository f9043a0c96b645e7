"""WBSR supernet architectures, registered in BasicSR's ARCH_REGISTRY.

Importing this package (or any ``wbsr_*`` package) registers all WBSR types in BasicSR.
"""
import wbsr_hook

wbsr_hook.prepare_basicsr_import()

from basicsr.utils.registry import ARCH_REGISTRY  # noqa: E402

from .edsr_arch import WBSREDSR  # noqa: E402
from .flops import count_flops  # noqa: E402
from .rcan_arch import WBSRRCAN  # noqa: E402
from .srresnet_arch import WBSRSRResNet  # noqa: E402
from .supernet import SupernetMixin  # noqa: E402

wbsr_hook.register(ARCH_REGISTRY, [WBSRSRResNet, WBSRRCAN, WBSREDSR])
wbsr_hook.register_all()

__all__ = ['WBSRSRResNet', 'WBSRRCAN', 'WBSREDSR', 'SupernetMixin', 'count_flops']
