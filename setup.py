"""Packaging for the WBSR plugin for BasicSR.

Besides the four packages, the wheel carries ``wbsr-basicsr-hook.pth``: a one-line file that arms
:mod:`wbsr_hook` at interpreter start, so BasicSR's own runners find the WBSR types.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HOOK_PTH = 'wbsr-basicsr-hook.pth'
# A .pth line that starts with "import" is executed by site.py at start-up, in every Python process of the
# environment (pip included). It must never break the interpreter, so failures are reported in one line
# instead of a traceback, and it must cost next to nothing: wbsr_hook imports only os and sys (already
# loaded by site) and arms two finders; WBSR_DISABLE_HOOK=1 leaves out the registration, not the
# torchvision alias that `import basicsr` needs (see wbsr_hook).
HOOK_LINE = ("import sys; exec('try:\\n import wbsr_hook; wbsr_hook.install()\\nexcept Exception as e:\\n"
             " print(\"wbsr: import hook not armed:\", repr(e), file=sys.stderr)')\n")


class BuildPyWithHook(build_py):
    """build_py that also writes the hook's .pth file at the root of the wheel (editable ones too)."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            # PEP 660 editable wheels are assembled from the install command's lib directory.
            target_dir = self.get_finalized_command('install').install_lib
        else:
            target_dir = self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, HOOK_PTH)
        with open(target, 'w', encoding='utf-8') as f:
            f.write(HOOK_LINE)
        self._hook_output = target

    def get_outputs(self, *args, **kwargs):
        outputs = list(super().get_outputs(*args, **kwargs))
        hook = getattr(self, '_hook_output', None)
        if hook and not getattr(self, 'editable_mode', False):
            outputs.append(hook)
        return outputs


def read(name):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding='utf-8') as f:
        return f.read()


INSTALL_REQUIRES = [
    # The plugin patches BasicSR internals (parse_options, BaseModel's progress methods, train.py's root
    # path): only the range it is tested with. scripts/test_basicsr_versions.sh runs the suite against the
    # other BasicSR builds in that range that PyPI offers (basicsr-fixed).
    'basicsr>=1.4.2,<1.5',
    'torch>=2.1',
    'torchvision>=0.16',
    'numpy>=1.24',
    'opencv-python>=4.8',
    'lmdb>=1.4',
    'scikit-learn>=1.3',
    'scikit-image>=0.21',
    'pyyaml>=6.0',
    'matplotlib>=3.7',
    'pillow>=9.1',  # image headers (size before decoding) and EXIF orientation
    'tqdm>=4.64',
]
TEST_REQUIRES = ['pytest>=7.4', 'hypothesis>=6.80']

setup(
    name='wbsr-basicsr',
    version='0.1.0',
    description='WBSR (HES sampling, BDLoss, slimmable supernets, gradient-projection dynamic inference) '
    'as a BasicSR plugin',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=[f'{p}{s}' for p in ('wbsr_arch', 'wbsr_data', 'wbsr_losses', 'wbsr_models')
                                    for s in ('', '.*')]),
    py_modules=['wbsr_hook'],
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': TEST_REQUIRES},
    entry_points={
        'console_scripts': [
            'wbsr-train=wbsr_models.runners:train_main',
            'wbsr-test=wbsr_models.runners:test_main',
            'wbsr-infer=wbsr_models.infer:main',
            'wbsr-demo=wbsr_models.demo:main',
            'wbsr-inspect=wbsr_data.inspect:main',
            'wbsr-make-lr=wbsr_data.make_lr:main',
            'wbsr-fit-gmm=wbsr_losses.fit_gmm:main',
            'wbsr-calibrate=wbsr_models.calibrate:main',
        ],
    },
    cmdclass={'build_py': BuildPyWithHook},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
