"""Compile every Triton kernel for a GPU target on a machine without one.

The CPU interpreter is more permissive than the GPU compiler (e.g. it runs tl.dot on 8x8 tiles,
which the GPU rejects), so interpreted tests alone do not prove the kernels build. This lowers each
kernel through Triton's real pipeline to a cubin for the target (H100 = sm_90 by default) and
reports the shared memory each config needs, against the device's limit, the registers and
spills per thread (``ptxas -v``), and counts of the PTX instructions the kernels' speed rests on
(tensor-core MMAs, 128-bit loads and stores).

    TRITON_INTERPRET=0 python -m babymerge.kernels.gpu_compile [--arch 90] [--all-configs] \
        [--dtypes bf16,fp32]

Prints one JSON object; exits 1 if any compile fails. Must run with the interpreter off (in its own
process: the switch is read when the kernels are imported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per block when opted in (Triton does): H100/H200 (sm_90) 227 KB, A100 163 KB,
# A10 / L4 (sm_86 / sm_89, the paper trained on A10s) 99 KB.
SHARED_LIMIT_BYTES = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# The JIT specialises arguments divisible by 16 (tensors from torch's allocator are; the paper's
# K = 1024, H = N = 768 are), which lets it vectorise loads; compile with the same facts. M is left
# unspecialised (any batch size).
SIZES = ["K", "H", "N", "M_BUCKET", "N_OUT", "K_IN", "SLAB"]


def _divisible(fn, names: list[str]) -> dict:
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names
            if a in fn.arg_names}


def _specs(dtype: str, all_configs: bool):
    """(kernel name, jit function, signature, constexprs, options, attrs) per launch to check.
    Without ``all_configs`` only each kernel's config with the largest tiles (the one most likely
    to exceed shared memory or registers)."""
    from babymerge.kernels import interpolation as I
    from babymerge.kernels import projector as P

    from triton.runtime.jit import JITFunction

    def jit(fn):
        while not isinstance(fn, JITFunction):  # under triton.autotune the JITFunction is .fn
            fn = fn.fn
        return fn

    def tile_volume(cfg):
        return sum(v for k, v in cfg.kwargs.items()) + max(cfg.kwargs.values()) ** 2

    grads = dict(DO_X=True, DO_W1=True, DO_W2=True, HAS_B1=True, HAS_B2=True)
    slabs = ("dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr")  # fp32 partials when the reduction splits
    launches = [  # (kernel, flags, pointers that are fp32 whatever the dtype)
        ("_projector_fwd_kernel", dict(HAS_B1=True, HAS_B2=True, SAVE_Z=True), ()),
        ("_linear_kernel", dict(GELU_A=False, HAS_BIAS=True), ()),  # z = x W1^T + b1
        ("_linear_kernel", dict(GELU_A=True, HAS_BIAS=False), ()),  # y = gelu(z) W2^T
        ("_projector_bwd_dz_kernel", {}, ()),
        ("_projector_bwd_grads_kernel", dict(grads, SPLIT_R=1), ()),
        ("_projector_bwd_grads_kernel", dict(grads, SPLIT_R=4), slabs),
    ]
    configs_of = {"_projector_fwd_kernel": P._FWD_CONFIGS, "_linear_kernel": P._LIN_CONFIGS,
                  "_projector_bwd_dz_kernel": P._DZ_CONFIGS,
                  "_projector_bwd_grads_kernel": P._GRAD_CONFIGS}
    precision = "ieee"
    for name, flags, fp32_ptrs in launches:
        fn = jit(getattr(P, name))
        configs = configs_of[name]["fp32" if dtype == "fp32" else "16bit"]
        chosen = configs if all_configs else [max(configs, key=tile_volume)]
        for cfg in chosen:
            const = dict(flags, UPCAST=False, PRECISION=precision, **cfg.kwargs)
            sig = {a: "constexpr" if a in const else
                   ("*fp32" if a in fp32_ptrs else f"*{dtype}") if a.endswith("_ptr") else "i32"
                   for a in fn.arg_names}
            yield (name, fn, sig, const, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                   _divisible(fn, [a for a in fn.arg_names if a.endswith("_ptr")] + SIZES))
    tl_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    import triton.language as tl

    fn = jit(I._interpolate_kernel)
    dt = getattr(tl, tl_dtype)
    const = dict(DST=dt, A=dt, B=dt, BLOCK=I.BLOCK, ALIGNED=True)
    sig = {"table_ptr": "*i64", "n_tensors": "i32", "alpha": "fp32",
           **{k: "constexpr" for k in const}}
    yield ("_interpolate_kernel", fn, sig, const, dict(num_warps=I.NUM_WARPS),
           _divisible(fn, ["table_ptr"]))


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread from the ptxas bundled with Triton (``ptxas -v``);
    empty if no bundled ptxas accepts this PTX version."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in ("ptxas", "ptxas-blackwell"):
            path = os.path.join(bin_dir, exe)
            if not os.path.exists(path):
                continue
            done = subprocess.run([path, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.devnull],
                                  capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", done.stderr)
            spills = re.search(r"(\d+) bytes spill stores", done.stderr)
            if done.returncode == 0 and regs:
                return {"registers": int(regs.group(1)),
                        "spill_bytes": int(spills.group(1)) if spills else 0}
    return {}


# Instructions whose presence says a kernel compiled the way its speed depends on: tensor-core
# MMAs (Hopper's asynchronous warpgroup MMA, or the older synchronous one for tiles under 64 rows)
# and 128-bit global accesses (the merge kernel streams its tensors with them).
PTX_COUNTS = {"wgmma": r"\bwgmma\.mma_async", "mma_sync": r"\bmma\.sync",
              "ld_v4": r"\bld\.global\S*\.v4\b", "st_v4": r"\bst\.global\S*\.v4\b",
              "cp_async": r"\bcp\.async\.c[ag]\b"}


def _ptx_counts(ptx: str) -> dict:
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16",), all_configs: bool = False
                ) -> dict:
    """Compile the kernels for ``cuda:sm_<arch>``; one record per (kernel, dtype, config)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernels.gpu_compile needs TRITON_INTERPRET=0 (run it in its own "
                           "process): interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    limit = SHARED_LIMIT_BYTES.get(arch)
    records = []
    for dtype in dtypes:
        for name, fn, sig, const, options, attrs in _specs(DTYPES[dtype], all_configs):
            rec = {"kernel": name, "dtype": dtype,
                   "config": {k: (str(v) if not isinstance(v, (int, bool)) else v)
                              for k, v in const.items() if k.startswith("BLOCK")},
                   **options}
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, sig, const, attrs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                rec["shared_bytes"] = compiled.metadata.shared
                rec.update(_ptxas_usage(compiled.asm["ptx"], arch))
                rec["ptx"] = _ptx_counts(compiled.asm["ptx"])
                rec["ok"] = limit is None or compiled.metadata.shared <= limit
                if not rec["ok"]:
                    rec["error"] = f"needs {compiled.metadata.shared} B of shared memory > {limit}"
            except Exception as e:  # report every failure, then fail the run as a whole
                rec["ok"] = False
                rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rec["compile_s"] = round(time.perf_counter() - start, 2)
            records.append(rec)
    return {"target": f"cuda sm_{arch}", "shared_limit_bytes": limit,
            "triton": triton.__version__, "records": records,
            "ok": all(r["ok"] for r in records)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    p.add_argument("--dtypes", default="bf16", help="comma list of fp32,bf16,fp16")
    p.add_argument("--all-configs", action="store_true",
                   help="every autotune config, not only each kernel's largest")
    args = p.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; choose from {', '.join(DTYPES)}")
    report = compile_all(args.arch, dtypes, args.all_configs)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
