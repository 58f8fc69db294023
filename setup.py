"""Build of infigw and its optional extension ``infigw._C``.

The C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are built whenever torch is importable at build
time; the CUDA kernels (``csrc/cuda/*.cu``) are added when torch has CUDA and nvcc is found. The extension is
*optional*: if torch is missing or the compiler fails, the package still installs and runs on the pure-PyTorch
reference path. Build with ``pip install --no-build-isolation -e .`` so the installed torch is used.

Environment switches:
  INFIGW_NO_EXTENSION=1     build no extension at all (pure-Python install)
  INFIGW_SKIP_CUDA_BUILD=1  build the CPU kernels only, even where CUDA is available
  INFIGW_FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (needs CUDA torch + nvcc)
  INFIGW_CUDA_ARCHS="80;90" CUDA targets (default: sm_80 and sm_90)
  INFIGW_DEBUG=1            -O0 -g
"""
import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _version():
    with open(os.path.join(ROOT, "infigw", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _extensions():
    """Return (ext_modules, cmdclass); both empty when no extension can or should be built."""
    if _flag("INFIGW_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("infigw: torch not importable at build time; installing the pure-PyTorch package only")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        bool(cuda_sources)
        and not _flag("INFIGW_SKIP_CUDA_BUILD")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and (_flag("INFIGW_FORCE_CUDA") or torch.cuda.is_available())
    )
    debug = _flag("INFIGW_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17"]  # py_limited_api=True below defines Py_LIMITED_API
    if cpp_extension.check_compiler_ok_for_platform("c++"):
        cxx.append("-fopenmp")
    extra = {"cxx": cxx}
    kwargs = dict(
        name="infigw._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
        optional=True,  # a failed compile leaves the package on the reference path
    )
    if with_cuda:
        archs = os.environ.get("INFIGW_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        extra["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]
        extra["nvcc"] += ["-std=c++17", "-DINFIGW_WITH_CUDA"] + gencode
        extra["cxx"] = extra["cxx"] + ["-DINFIGW_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            sources=cpp_sources + cuda_sources, extra_compile_args=extra, **kwargs
        )
    else:
        ext = cpp_extension.CppExtension(sources=cpp_sources, extra_compile_args=extra, **kwargs)
    print(f"infigw: building infigw._C ({'CPU + CUDA' if with_cuda else 'CPU'} kernels)")
    build = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    name="infigw",
    version=_version(),
    description="Kernel-accelerated Graph-on-Logits Distillation (GLD) and fusion losses for LLMs",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["infigw", "infigw.*"]),
    install_requires=["numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # The CPU tests run Triton kernels in its interpreter, whose behaviour changes between releases: pin the
        # version they are checked with (3.6.0, also on the GPU machines), and numpy < 2.4 (triton-lang/triton#9171).
        "test": ["pytest", "pytest-benchmark", "pot", "scipy", "triton==3.6.0", "numpy<2.4", "safetensors", "tqdm",
                 "pyarrow", "pyyaml", "hypothesis", "trl"],
        "bench": ["pot", "scipy", "matplotlib", "tqdm", "pytest-benchmark"],
        "merge": ["safetensors", "tqdm", "pyyaml"],
        # 4.48: the first release whose Llama and GPT-2 return Cache objects, which beam search with DLF reorders;
        # accelerate, datasets, pyyaml: fusion training (infigw.train, python -m infigw.fuse)
        "hf": ["transformers>=4.48", "accelerate", "datasets", "pyyaml"],
        # infigw.records: the store and its importers (capture also needs the "hf" extra)
        "records": ["pyarrow>=14", "pyyaml", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
