"""bench/kernel_report.py: the ptxas-output parser, the occupancy formula and the check on fixed
inputs, and one real run (subprocess: every CLIP kernel compiled for sm_90, JSON checked)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_SCRIPT = "kernel_report"
ROOT = Path(__file__).resolve().parents[2]

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_helper_kernel' for 'sm_90a'
ptxas info    : Function properties for _helper_kernel
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_kernel
    800 bytes stack frame, 820 bytes spill stores, 816 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 800 bytes cumulative stack size
ptxas info    : Compile time = 294.047 ms
"""


# ----------------------------------------------------------------------------- parser


def test_parse_ptxas_picks_the_named_entry(bench):
    r = bench.parse_ptxas(PTXAS_LOG, "_attn_fwd_kernel")
    assert (r["registers"], r["spill_stores"], r["spill_loads"], r["stack_frame"], r["smem_static"],
            r["barriers"]) == (255, 820, 816, 800, 0, 1)
    first = bench.parse_ptxas(PTXAS_LOG)  # default: the first entry
    assert first["kernel"] == "_helper_kernel"
    assert (first["registers"], first["spill_stores"], first["spill_loads"], first["smem_static"]) == (40, 4, 4, 1024)


def test_parse_ptxas_no_spill_line_means_zero(bench):
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Used 32 registers, used 1 barriers\n")
    r = bench.parse_ptxas(log, "k")
    assert (r["registers"], r["spill_stores"], r["spill_loads"], r["smem_static"]) == (32, 0, 0, 0)


def test_parse_ptxas_rejects_missing_entry_or_registers(bench):
    with pytest.raises(ValueError, match="not in the ptxas output"):
        bench.parse_ptxas(PTXAS_LOG, "_nope")
    with pytest.raises(ValueError, match="Compiling entry function"):
        bench.parse_ptxas("ptxas fatal   : Unresolved extern function 'f'\n")
    with pytest.raises(ValueError, match="registers"):
        bench.parse_ptxas("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n", "k")


def test_tensor_core_and_target_detection(bench):
    assert bench.tensor_core_ops("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert bench.tensor_core_ops("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.sync"
    assert bench.tensor_core_ops("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"
    assert bench.ptx_target("//\n.version 8.8\n.target sm_90a\n.address_size 64\n") == "sm_90a"
    with pytest.raises(ValueError):
        bench.ptx_target(".version 8.8\n")


# ----------------------------------------------------------------------------- occupancy


@pytest.mark.parametrize("regs, smem, warps, blocks, limiter", [
    (32, 0, 4, 16, "registers"),  # 1024 regs/warp: 16 warps per sub-partition = 64 warps = threads too
    (33, 0, 4, 12, "registers"),  # 33 * 32 = 1056 rounds up to 1280 regs per warp: 12 warps per sub-partition
    (255, 0, 8, 1, "registers"),  # 8192 regs/warp: 2 warps per sub-partition, 8 per SM
    (200, 0, 2, 4, "registers"),  # 6400 regs/warp: 2 per sub-partition (8 per SM, not 65536 // 6400 = 10)
    (16, 0, 1, 32, "blocks"),  # 32 one-warp blocks: the block limit
    (32, 100 * 1024, 4, 2, "smem"),  # (102400 + 1024 reserved) per block: 2 in 228 KiB
    (32, 227 * 1024, 4, 1, "smem"),  # the per-block maximum still fits once
    (32, 227 * 1024 + 1, 4, 0, "smem/block"),
    (255, 0, 16, 0, "regs/block"),  # 16 x 8192 registers > 65536 per block
    (64, 0, 32, 1, "registers"),  # 1024 threads, 2048 regs/warp: 64K registers, one block
])
def test_occupancy_formula(bench, regs, smem, warps, blocks, limiter):
    o = bench.occupancy(regs, smem, warps)
    assert o["blocks_per_sm"] == blocks
    assert o["warps_per_sm"] == blocks * warps
    assert o["occupancy"] == pytest.approx(blocks * warps / 64)
    assert o["limiter"] == limiter


def test_occupancy_rejects_zero_warps(bench):
    with pytest.raises(ValueError):
        bench.occupancy(32, 0, 0)


# ----------------------------------------------------------------------------- the check


def _row(**kw):
    row = dict(kernel="attention._attn_fwd_kernel", dtype="bf16", shapes=["B/32 image L=50"], error=None,
               spill_stores=0, spill_loads=0, has_dot=True, tensor_cores="wgmma", smem_total=1024,
               blocks_per_sm=2, limiter="registers", emulate=False)
    row.update(kw)
    return row


def test_check_gates_bf16_spills_and_dots_without_tensor_cores(bench):
    assert bench.check_failures(_row()) == []
    assert "spills" in bench.check_failures(_row(spill_stores=4))[0]
    assert "spills" in bench.check_failures(_row(spill_loads=4))[0]
    assert "tensor-core" in bench.check_failures(_row(tensor_cores="none"))[0]
    assert bench.check_failures(_row(tensor_cores="none", has_dot=False)) == []  # no dot, nothing to gate
    assert bench.check_failures(_row(tensor_cores="mma.sync")) == []


def test_check_does_not_gate_fp32_but_reports_it(bench):
    fp32 = _row(dtype="fp32", spill_stores=820, spill_loads=820, tensor_cores="none")
    assert bench.check_failures(fp32) == []
    assert len(bench.would_fail_ungated(fp32)) == 2


def test_check_gates_every_dtype_on_launchability_and_emulation(bench):
    assert bench.check_failures(_row(dtype="fp32", smem_total=300 * 1024))
    assert bench.check_failures(_row(dtype="fp32", blocks_per_sm=0, limiter="regs/block"))
    assert bench.check_failures(_row(dtype="fp32", emulate=True))
    assert bench.check_failures(_row(error="CompilationError: boom"))[0].startswith("does not compile")


def test_main_check_exits_nonzero_and_names_failing_rows(bench, monkeypatch, capsys, tmp_path):
    rows = [_row(spill_stores=8), _row(kernel="contrastive._lse_rows_kernel", tensor_cores="none"),
            _row(kernel="layer_norm._ln_fwd_kernel", has_dot=False, tensor_cores="none"),
            _row(kernel="contrastive._grad_rows_kernel", dtype="fp32", spill_stores=820)]
    for r in rows:
        r.update(registers=64, constexprs={}, num_warps=4, num_stages=2, occupancy=0.25)
        r["check"] = bench.check_failures(r)
    doc = dict(rows=rows, triton_version="x", elapsed_s=0.0, command="c", date="d", commit="c",
               ptxas_version="p", target="t",
               failures=[dict(kernel=r["kernel"], dtype=r["dtype"], shapes=r["shapes"], why=r["check"])
                         for r in rows if r["check"]])
    monkeypatch.setattr(bench, "run", lambda *a, **k: doc)
    out_md = tmp_path / "RESULTS.md"
    assert bench.main(["--check", "--quiet", "--write", str(out_md)]) == 1
    out = capsys.readouterr().out
    assert "FAIL attention._attn_fwd_kernel bf16" in out and "FAIL contrastive._lse_rows_kernel bf16" in out
    assert "layer_norm" not in out.split("rows fail the check")[1]
    assert "_grad_rows_kernel" not in out.split("rows fail the check")[1]  # fp32: not gated
    assert "**FAIL**" in out_md.read_text()
    assert bench.main(["--quiet"]) == 0  # without --check: reported, exit 0
    doc["failures"] = []
    for r in rows:
        r["check"] = []
    assert bench.main(["--check", "--quiet"]) == 0


def test_write_section_replaces_only_its_own(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    bench.write_section(out, f"{bench.BEGIN}\nfirst\n{bench.END}\n")
    bench.write_section(out, f"{bench.BEGIN}\nsecond\n{bench.END}\n")
    text = out.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(bench.BEGIN) == 1 and text.index("keep me") < text.index(bench.BEGIN)


# ----------------------------------------------------------------------------- a real run

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# every kernel the GPU path launches, and which of them contain a tl.dot
KERNELS = {
    "attention._attn_fwd_kernel": True, "attention._attn_bwd_delta_kernel": False,
    "attention._attn_bwd_dkdv_kernel": True, "attention._attn_bwd_dq_kernel": True,
    "layer_norm._ln_fwd_kernel": False, "layer_norm._ln_bwd_kernel": False,
    "bias_act._bias_act_fwd_kernel": False, "bias_act._bias_act_bwd_kernel": False,
    "contrastive._lse_rows_kernel": True, "contrastive._grad_rows_kernel": True,
}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton_cache_report"))
    return env


@needs_triton
def test_report_compiles_every_clip_kernel(bench, tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--json", str(out), "--quiet"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr:
        pytest.skip("triton's ptxas is unavailable")
    assert out.exists(), p.stdout[-3000:] + p.stderr[-6000:]
    doc = json.loads(out.read_text())
    for key in ("date", "commit", "triton_version", "target", "ptxas_version", "rows"):
        assert doc.get(key), key
    rows = doc["rows"]
    errors = [r for r in rows if r.get("error")]
    assert not errors, errors
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for kernel, has_dot in KERNELS.items():
        for dt in ("bf16", "fp32"):
            mine = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dt]
            assert mine, f"no row for {kernel} {dt}"
            assert all(r["has_dot"] == has_dot for r in mine), (kernel, [r["has_dot"] for r in mine])
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_stores"] >= 0 and r["spill_loads"] >= 0 and r["smem_total"] >= r["smem_triton"] >= 0, r
        assert 0 <= r["occupancy"] <= 1 and r["blocks_per_sm"] >= 1, r
        assert r["emulate"] in (False, None), r  # the GPU never runs the interpreter's emulation
        assert r["tensor_cores"] in ("wgmma", "mma.sync", "none")
        assert r["check"] == bench.check_failures(r)
        if r.get("registers_cubin") is not None:  # ptxas -v agrees with Triton's own cubin
            assert r["registers_cubin"] == r["registers"], r
    # every CLIP shape is compiled, including varlen attention with per-sequence causal flags
    shapes = {s for r in rows for s in r["shapes"]}
    assert shapes <= {c.shape for c in bench.CLIP_CASES}
    for c in bench.CLIP_CASES:  # an optional case the launchers refuse is noted, not dropped silently
        assert c.shape in shapes or (c.optional and any(c.shape in n for n in doc["notes"])), c.shape
    assert any(r["constexprs"].get("VARLEN") and r["constexprs"].get("CAUSAL_MODE") == 2
               for r in rows if r["kernel"] == "attention._attn_fwd_kernel")
    ln = [r for r in rows if r["kernel"] == "layer_norm._ln_fwd_kernel"]
    assert all(r["constexprs"]["HAS_RES"] and r["constexprs"]["HAS_IDS"] for r in ln)
    assert all(r["constexprs"]["ACT"] == 0 for r in rows if r["group"] == "bias_act")
    # 16-bit dots reach the tensor cores
    assert all(r["tensor_cores"] != "none" for r in rows if r["has_dot"] and r["dtype"] == "bf16")


@needs_triton
def test_fallback_specialization_matches_tritons_binder():
    """The plain specialization (used if Triton's binder internals change) agrees with Triton's own
    on real launches: do_not_specialize, divisibility and ints equal to 1 folded."""
    code = """
from bench import kernel_report as kr
n = 0
for case, dt, launch in kr.record(kr.CLIP_CASES, ["bf16"]):
    a, b = kr._specialize(launch), kr._specialize_fallback(launch)
    assert a.how == "jit-binder", a.how
    assert a.signature == b.signature, (launch.fn.__name__, a.signature, b.signature)
    assert a.constexprs == b.constexprs, (launch.fn.__name__, a.constexprs, b.constexprs)
    na = {k: v for k, v in a.attrs.items() if v}
    assert na == b.attrs, (launch.fn.__name__, na, b.attrs)
    for k in ("num_warps", "num_stages"):
        if k in b.options:
            assert a.options[k] == b.options[k]
    n += 1
print("compared", n)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "compared" in p.stdout
