"""Build mlaan_fast._C: C++ CPU kernels always, CUDA kernels when a toolkit is found.

Environment:
  MLAAN_FAST_SKIP_CUDA=1   build the CPU kernels only
  FORCE_CUDA=1             build the CUDA kernels even if no toolkit/GPU is detected
  CUDA_HOME                the CUDA toolkit (otherwise found from `nvcc` on PATH)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root(nvcc_path):
    """The toolkit folder behind an `nvcc`, following symlinks and small `exec` wrapper scripts."""
    for _ in range(4):
        nvcc_path = os.path.realpath(nvcc_path)
        root = os.path.dirname(os.path.dirname(nvcc_path))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
        try:
            with open(nvcc_path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if b"\0" in head:  # a real binary outside a toolkit layout
            return None
        m = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if not m:
            return None
        nvcc_path = m.group(1).decode()
    return None


def find_cuda_home():
    """CUDA_HOME if set and valid, else the toolkit that `nvcc` on PATH really runs."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        return _toolkit_root(os.path.join(env, "bin", "nvcc")) or env
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_root(nvcc)
    default = "/usr/local/cuda"
    if os.path.exists(os.path.join(default, "bin", "nvcc")):
        return _toolkit_root(os.path.join(default, "bin", "nvcc"))
    return None


def want_cuda(cuda_home):
    if os.environ.get("MLAAN_FAST_SKIP_CUDA", "0") == "1":
        return False, "MLAAN_FAST_SKIP_CUDA=1"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    toolkit = toolkit_version(cuda_home)
    if toolkit and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch.utils.cpp_extension refuses to mix CUDA major versions.
        major = torch.version.cuda.split(".")[0]
        return False, (f"the toolkit at {cuda_home} is CUDA {toolkit}, torch {torch.__version__} was built "
                       f"with CUDA {torch.version.cuda} (set CUDA_HOME to a CUDA {major} toolkit)")
    return True, f"toolkit at {cuda_home}"


def toolkit_version(cuda_home):
    """'13.0' from the toolkit's nvcc, or None if it cannot be read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA, WHY = want_cuda(CUDA_HOME)
print(f"[mlaan_fast] CUDA kernels: {'yes' if WITH_CUDA else 'no'} ({WHY})", file=sys.stderr)

def nvidia_wheel_includes():
    """Header folders of the nvidia-* pip wheels torch depends on (cuBLAS, cuSPARSE, ...).

    A minimal toolkit (nvcc + runtime) lacks the library headers that ATen's CUDA headers include;
    the wheels torch itself runs on carry them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in found if os.path.isdir(d)]


def torch_libstdcxx():
    """The shared C++ runtime (libstdc++) this process, with torch loaded, runs on; [] if none is seen.

    Named on the link line so that _C uses torch's own runtime even where the compiler would link
    its static libstdc++.a into a shared object (seen on a GCC whose library folder holds only the
    archive, and that also links shared objects -Bsymbolic): a second, private copy of the C++
    runtime inside _C crashed the process on the first error message built from several parts
    (its own locale state), where a one-literal message went through."""
    import torch  # noqa: F401  (loads libstdc++)

    try:
        with open("/proc/self/maps") as maps:
            # address perms offset dev inode path (the path may hold spaces)
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(paths)[:1]


# Layout (README, "Fused operators"): csrc/<op>/ and csrc/common/ hold the C++ (g++), kernels/ the
# CUDA device code (nvcc); includes are relative to csrc/ and kernels/.
cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 or C++20)
define_macros = []
if WITH_CUDA:
    # Searched after the toolkit's own headers: they only fill in what a minimal toolkit lacks.
    after_includes = [f for d in nvidia_wheel_includes() for f in ("-idirafter", d)]
    define_macros.append(("MLAAN_FAST_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "mlaan_fast._C",
        sources=cpp_sources + sorted(glob.glob("kernels/**/*.cu", recursive=True)),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags + after_includes,
            "nvcc": ["-O3", "-lineinfo"]
            + [f"-Xcompiler=-idirafter,{d}" for d in nvidia_wheel_includes()],
        },
        extra_link_args=["-fopenmp"] + torch_libstdcxx(),
    )
else:
    ext = CppExtension(
        "mlaan_fast._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] + torch_libstdcxx(),
    )

setup(
    packages=find_packages(include=["mlaan_fast", "mlaan_fast.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
