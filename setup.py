"""mlmfast packaging.

`kernels/` is installed as `mlmfast.kernels` (a top-level `kernels` package would collide with an existing
PyPI package).

`mlmfast._C` (csrc/) is built with plain pybind11 on raw pointers, never with torch's C++ headers, so a
build-isolated `pip install -e .` does not pull torch into the build environment:
  - the C++ part (the CPU twin of the mask-select kernel) always; OpenMP when the compiler has it;
  - the CUDA part (csrc/*.cu, compiled by nvcc, linked with the static CUDA runtime so the module imports
    on machines without a GPU and with whatever CUDA torch carries) when nvcc is found.
Environment:
  MLMFAST_CUDA=0 skip the CUDA part; =1 require it (fail without nvcc); unset: build it when nvcc is found
  MLMFAST_CUDA_ARCHS="80;90" SM targets (each as SASS; the highest also as PTX for newer GPUs)
  CUDA_HOME / CUDA_PATH where CUDA lives (else nvcc on PATH, then /usr/local/cuda)
Without pybind11 (only possible with --no-build-isolation) the package installs without `mlmfast._C` and
runs its pure-PyTorch fallbacks.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_ext import build_ext

INSTALL_REQUIRES = [
    "torch>=2.11",
    "numpy",
    "triton>=3.6; platform_system == 'Linux'",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "tqdm",
    "matplotlib",
]
EXTRAS = {
    "hf": ["transformers>=4.40"],
    "test": ["transformers>=4.40", "pytest", "hypothesis"],
}
EXTRAS["all"] = sorted(set(EXTRAS["hf"] + EXTRAS["test"]))

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPP_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/mask_select_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/mask_select.cu", f"{CSRC}/gather.cu"]
HEADERS = [f"{CSRC}/{h}" for h in ("philox.h", "mask_select.h", "cuda_api.h", "cuda_utils.cuh", "mask_select_kernel.cuh",
                                     "gather_kernel.cuh")]
DEFAULT_ARCHS = "80;90"


def _log(msg: str) -> None:
    print(f"mlmfast setup: {msg}", file=sys.stderr)


def find_cuda():
    """(nvcc, cuda_home) or (None, reason)."""
    nvcc = None
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    for home in filter(None, homes):
        cand = os.path.join(home, "bin", "nvcc")
        if os.path.exists(cand):
            nvcc = cand
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    homes += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if _cudart_static(home):
            return nvcc, home
    return None, f"{nvcc} found but no libcudart_static.a next to it (set CUDA_HOME)"


def _cudart_static(home: str):
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        path = os.path.join(home, sub, "libcudart_static.a")
        if os.path.exists(path):
            return path
    return None


def cuda_archs():
    raw = os.environ.get("MLMFAST_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?", a)]
    if bad or not archs:
        raise SystemExit(f"MLMFAST_CUDA_ARCHS={raw!r}: expected SM numbers such as '80;90' or '90a' (got {bad})")
    return archs


def nvcc_flags(archs):
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "--expt-relaxed-constexpr", "-lineinfo", f"-I{os.path.join(HERE, CSRC)}", "-DMLMFAST_WITH_CUDA"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda a: int(a.rstrip("af")))  # "90a": arch-specific features, still SM 90
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]  # PTX for GPUs newer than the list
    return flags


class BuildExt(build_ext):
    """build_ext that adds OpenMP when available and compiles csrc/*.cu with nvcc (see the module docstring)."""

    def build_extensions(self):
        for ext in self.extensions:
            if getattr(ext, "mlmfast_cuda_sources", None) is not None:
                self._configure(ext)
        super().build_extensions()

    # -- OpenMP ---------------------------------------------------------------------------------------------
    def _has_openmp(self) -> bool:
        if os.environ.get("MLMFAST_OPENMP", "1") == "0":
            return False
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp_check.cpp")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\n"
                        "return n > 0 ? 0 : 1; }\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, os.path.join(tmp, "omp_check"), extra_postargs=["-fopenmp"])
                return True
            except Exception:  # no OpenMP: the twin runs its rows on one thread
                return False

    @staticmethod
    def _no_cuda(ext, reason: str) -> None:
        """Build the CPU part only; mlmfast._C.CUDA_SKIP_REASON tells why (`mlmfast info` prints it)."""
        _log(f"CUDA part not built: {reason}")
        clean = "".join(c for c in reason if c.isprintable() and c not in '"\\')
        ext.define_macros.append(("MLMFAST_CUDA_SKIP_REASON", f'"{clean}"'))

    # -- configuration of the one extension ------------------------------------------------------------------
    def _configure(self, ext):
        ext.extra_compile_args += ["-O3", "-ffp-contract=off"]
        if self._has_openmp():
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
            _log("OpenMP: on")
        else:
            _log("OpenMP: off (compiler without -fopenmp); the CPU twin is single-threaded")

        mode = os.environ.get("MLMFAST_CUDA", "").strip().lower()
        if mode in ("0", "off", "false", "no"):
            self._no_cuda(ext, "skipped at build time (MLMFAST_CUDA=0)")
            return
        nvcc, home = find_cuda()
        if nvcc is None:
            if mode in ("1", "on", "true", "yes"):
                raise RuntimeError(f"MLMFAST_CUDA=1 but {home}")
            warnings.warn(f"mlmfast: building mlmfast._C without its CUDA part: {home}. "
                          "The CPU twin and the PyTorch fallbacks are used.")
            self._no_cuda(ext, f"{home} at build time")
            return
        archs = cuda_archs()
        os.makedirs(self.build_temp, exist_ok=True)
        jobs = []
        for src in ext.mlmfast_cuda_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            jobs.append((src, obj, [nvcc, "-c", os.path.join(HERE, src), "-o", obj] + nvcc_flags(archs)))
        _log(f"compiling CUDA with {nvcc} for sm_{', sm_'.join(archs)}")
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
                results = list(pool.map(lambda j: subprocess.run(j[2], capture_output=True, text=True), jobs))
            for (src, _, cmd), res in zip(jobs, results):
                if res.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
        except Exception as exc:
            if mode in ("1", "on", "true", "yes"):
                raise
            warnings.warn(f"mlmfast: CUDA part not built ({exc}); building the CPU part only")
            self._no_cuda(ext, "nvcc failed at build time (see the build log)")
            return
        ext.extra_objects += [obj for _, obj, _ in jobs]
        ext.define_macros += [("MLMFAST_WITH_CUDA", None), ("MLMFAST_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
        ext.extra_link_args += [_cudart_static(home), "-lrt", "-ldl", "-lpthread"]
        _log("CUDA part: on")


def extensions():
    if os.environ.get("MLMFAST_BUILD_EXT", "1") == "0":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        warnings.warn("mlmfast: pybind11 is not installed; installing without mlmfast._C "
                      "(pure-PyTorch fallbacks). pip install pybind11 and reinstall to build it.")
        return []
    ext = Pybind11Extension("mlmfast._C", CPP_SOURCES, include_dirs=[CSRC], depends=HEADERS + CUDA_SOURCES,
                            cxx_std=17)
    ext.mlmfast_cuda_sources = CUDA_SOURCES
    return [ext]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers above
    setup(
        name="mlmfast",
        version="0.1.0",
        description="Fast masked-language-model pretraining for BERT-style encoders",
        python_requires=">=3.10",
        packages=["mlmfast", "mlmfast.kernels"],
        package_dir={"mlmfast": "mlmfast", "mlmfast.kernels": "kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt},
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS,
        entry_points={"console_scripts": ["mlmfast=mlmfast.cli:main"]},
    )
