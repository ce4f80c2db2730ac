"""Smoke runs of the speed benchmarks (``lowbit bench kernels``, ``lowbit bench models``).

No timing assertions (CI machines vary): every expected row is there, every timing column is
filled, and the speed-ups are finite positive numbers.
"""

from __future__ import annotations

import math

from lowbit.bench import kernels, models
from lowbit.runtime import kernels as runtime_kernels
from lowbit.runtime.fused import default_isa


def finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_kernels_smoke() -> None:
    rows = kernels.main(["--smoke"])
    expected = {(name, b, t) for name, *_ in kernels.SMOKE_LAYERS for b in (1, 64) for t in (1, 2)}
    assert {(r["layer"], r["batch"], r["threads"]) for r in rows} == expected
    for r in rows:
        assert r["M"] > 0 and r["K"] > 0 and r["N"] > 0
        for key in ("fp32", *kernels.KERNELS):
            assert finite_positive(r[f"t_{key}"]), (key, r)
            assert finite_positive(r["t_fp32"] / r[f"t_{key}"])


def test_models_smoke() -> None:
    rows = models.main(["--smoke", "--avx2-baseline"])
    assert [r["method"] for r in rows] == models.METHODS
    for r in rows:
        assert set(r) == set(models.ROW_KEYS)
        assert (r["model"], r["batch"], r["threads"]) == (models.SMOKE_MODEL, 1, 1)
        assert finite_positive(r["fp32_ms"]) and finite_positive(r["lowbit_ms"])
        assert finite_positive(r["speedup"]) and finite_positive(r["speedup_avx2"])
        assert finite_positive(r["fp32_avx2_ms"])
        ratio = r["fp32_ms"] / r["lowbit_ms"]
        assert math.isclose(r["speedup"], ratio, rel_tol=1e-9)
        assert finite_positive(r["peak_rss_mib"])
        if r["ort_ms"] is not None:  # ONNX Runtime on the ONNX export
            assert math.isclose(r["speedup_ort"], r["fp32_ms"] / r["ort_ms"], rel_tol=1e-9)
    engines = {r["method"]: r["engine"] for r in rows}
    integer = "integer" if runtime_kernels.extension() is None else f"fused/{default_isa()}"
    assert engines["lsq"] == engines["affine"] == engines["twn_a8"] == integer
    assert engines["bnn"] == engines["ttq"] == "float"
    assert {r["method"] for r in rows if r["ort_ms"] is not None} >= {"lsq", "affine", "bnn"}
