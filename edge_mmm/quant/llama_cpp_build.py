"""Which llama.cpp build `numerics="llama.cpp"` (edge_mmm.quant.ggml_numerics) reproduces.

ggml's CPU arithmetic depends on how it was compiled: an AVX-512 build sums dot products in 16 lanes, an
AMX build repacks weights and multiplies tiles, a VNNI build takes other integer paths. So "bit-identical
to llama.cpp" only holds for one build. Ours is llama-cpp-python 0.3.36 compiled with the portable flags
the README pins (`GGML_NATIVE=OFF`, AVX/AVX2/FMA/F16C on, BMI2/AVX-512/AVX-VNNI/AMX off), which runs the
same instructions on every x86-64 host, Intel or AMD.

The build is identified by the feature list `llama_print_system_info()` prints, e.g.
`CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 |
REPACK = 1 |`. Features that do not change arithmetic (the thread pool) are ignored when comparing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

# Features whose presence does not change any result (threading only).
ARITHMETIC_NEUTRAL = frozenset({"OPENMP"})


@dataclass(frozen=True)
class LlamaCppBuild:
    version: str
    system_info: str

    @property
    def features(self) -> Dict[str, str]:
        return parse_system_info(self.system_info)


# The build the llama.cpp numerics mode was checked against (tests/text/test_llama_cpp_parity.py).
TARGET_BUILD = LlamaCppBuild(
    version="0.3.36",
    system_info="CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | "
                "OPENMP = 1 | REPACK = 1 |",
)


def parse_system_info(text: str) -> Dict[str, str]:
    """`NAME = value` pairs of `llama_print_system_info()` (all backends' sections), upper-cased names."""
    return {m.group(1).upper(): m.group(2) for m in re.finditer(r"([A-Za-z0-9_]+)\s*=\s*([^|\s]+)", text)}


def build_difference(version: str, system_info: str, target: LlamaCppBuild = TARGET_BUILD) -> Optional[str]:
    """None when `version` + `system_info` name the target build's arithmetic, else one line saying how
    they differ (for a skip reason or a benchmark header)."""
    parts = []
    if version != target.version:
        parts.append(f"version {version} (target {target.version})")
    have = {k: v for k, v in parse_system_info(system_info).items() if k not in ARITHMETIC_NEUTRAL}
    want = {k: v for k, v in target.features.items() if k not in ARITHMETIC_NEUTRAL}
    extra = sorted(k for k in have if k not in want)
    missing = sorted(k for k in want if k not in have)
    changed = sorted(k for k in have if k in want and have[k] != want[k])
    if extra:
        parts.append("has " + ", ".join(extra))
    if missing:
        parts.append("lacks " + ", ".join(missing))
    if changed:
        parts.append("differs in " + ", ".join(f"{k}={have[k]} (target {want[k]})" for k in changed))
    if not parts:
        return None
    return ("installed llama.cpp build is not the one numerics='llama.cpp' reproduces: " + "; ".join(parts)
            + " (install it with the README's pinned CMAKE_ARGS)")


def installed_build() -> LlamaCppBuild:
    """The llama-cpp-python build importable here (ImportError when none is installed)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return LlamaCppBuild(version=llama_cpp.__version__,
                         system_info=(info.decode() if isinstance(info, bytes) else str(info)).strip())
