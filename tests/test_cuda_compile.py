"""Compile checks of the CUDA kernels with nvcc, on machines without a GPU (CI).

The kernel bodies (``csrc/cuda/*.cuh``, with the torch-free ``csrc/contract.h`` and ``csrc/formulas.h``) include
no torch header, so one translation unit that includes them all and takes the address of every launcher
(``launch_*``; templated launchers for float, __half and __nv_bfloat16) makes nvcc compile every kernel through
ptxas for sm_80 and sm_90. The torch bindings
(``csrc/cuda/*.cu``) are checked too when ``INFIGW_CHECK_CUDA_BINDINGS=1`` and the installed torch ships
the c10/cuda headers (a CPU wheel does); that check costs about a minute of host compilation per file.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = ("80", "90")
ELEMENT_TYPES = ("float", "__half", "__nv_bfloat16")
# The flags setup.py and torch.utils.cpp_extension pass to nvcc, so the check sees what the build sees.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--use_fast_math", "-DINFIGW_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
]
LAUNCHER = re.compile(r"(template <typename T>\s*)?(?:inline\s+)?cudaError_t\s+(launch_\w+)\s*\(")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    pytest.skip("nvcc not found: not on PATH and CUDA_HOME/bin/nvcc does not exist")


def _kernel_headers():
    headers = sorted(CUDA_DIR.glob("*.cuh"))
    assert headers, f"no kernel headers in {CUDA_DIR}"
    return headers


def _launchers(header: Path):
    """[(name, templated)] of the launchers a kernel header defines."""
    return [(name, bool(templated)) for templated, name in LAUNCHER.findall(header.read_text())]


def _check_unit(headers) -> str:
    """A translation unit that ODR-uses every launcher of every header (for every element type)."""
    lines = [f'#include "{h.name}"' for h in headers]
    refs = []
    for header in headers:
        for name, templated in _launchers(header):
            types = ELEMENT_TYPES if templated else (None,)
            refs += [f"reinterpret_cast<void*>(&{name}<{t}>)" if t else f"reinterpret_cast<void*>(&{name})"
                     for t in types]
    assert refs, "no launch_* functions found in the kernel headers"
    lines += [
        "namespace infigw { namespace cuda {",
        "void* compile_check_launcher(int i) {",
        "  static void* const launchers[] = {" + ", ".join(refs) + "};",
        "  return launchers[i];",
        "}",
        "} }",
    ]
    return "\n".join(lines) + "\n"


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{result.stdout}\n{result.stderr}"


def test_every_kernel_header_has_launchers():
    """A header that defines a kernel also defines its launchers, or the compile check would miss the kernel."""
    kernel_headers = [h for h in _kernel_headers() if "__global__" in h.read_text()]
    assert kernel_headers, "no kernels found"
    for header in kernel_headers:
        assert _launchers(header), f"{header.name} defines no launch_* function, so the compile check misses it"


def test_kernels_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    unit = tmp_path / "kernels_check.cu"
    unit.write_text(_check_unit(_kernel_headers()))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    # --threads 0: one host thread per architecture, the whole check is a single nvcc call.
    _run([nvcc, "-c", *NVCC_FLAGS, *gencode, "--threads", "0", "-Werror", "all-warnings",
          f"-I{CUDA_DIR}", f"-I{ROOT / 'csrc'}", str(unit), "-o", str(tmp_path / "kernels_check.o")])


@pytest.mark.skipif(os.environ.get("INFIGW_CHECK_CUDA_BINDINGS") != "1",
                    reason="set INFIGW_CHECK_CUDA_BINDINGS=1 to compile the torch bindings (slow)")
def test_bindings_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    torch = pytest.importorskip("torch")
    include = Path(torch.__file__).parent / "include"
    if not (include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip(f"torch at {include} ships no c10/cuda headers")
    # A CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; its defaults are what we need.
    flags = [*NVCC_FLAGS, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-arch=sm_90",
             f"-I{ROOT / 'csrc'}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}"]
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no bindings in {CUDA_DIR}"
    procs = [(src, subprocess.Popen([nvcc, "-c", *flags, str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for src in sources]
    failures = []
    for src, proc in procs:
        output = proc.communicate()[0]
        if proc.returncode != 0:
            failures.append(f"{src.name}:\n{output}")
    assert not failures, "nvcc failed on the bindings:\n" + "\n".join(failures)
