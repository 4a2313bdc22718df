"""Everything GPU-side in one command for a short GPU lease: ceilings, correctness, the headline benchmark.

    python bench/gpu_check.py --out DIR [--budget-s 480]   # on the GPU machine (docs/gpu.md)
    python bench/gpu_check.py --out DIR --dry-run          # the same code paths on a CPU, tiny sizes (CI)

Written for a bare machine: one H100 or H200, torch 2.11, triton 3.6, Python 3.12, no internet, the
repository's working tree copied there and fastratio not installed (its ``kernels/`` folder, which only
an install maps to ``fastratio.kernels``, is aliased here). Every result is one JSON line appended to
DIR/results.jsonl and flushed and fsynced the moment it exists, so a command stopped by its time limit
keeps what finished. Each row has ``part``, ``item``, ``status`` (ok | failed | skipped | timeout) and
``t_s`` (seconds since start). The parts, in order of value:

  environment  GPU, driver, clocks (NVML, else nvidia-smi), versions, which packages are
               missing (and the wheel to carry), every fastratio module imported, and the ceilings:
               a bf16 matrix product (TFLOP/s) and a device-to-device copy (GB/s)
  correctness  ``pytest -m "gpu and not slow"`` in a child process (TRITON_INTERPRET=0, so Triton
               compiles for the GPU): graph mode against eager (DiJS and VSD, Triton kernels; the
               toy step compiled and captured, a tiny UNet's eager step captured: its cold compile
               takes minutes, so that variant is `slow`), no host read in an iteration, each kernel
               against its reference in fp32 and bf16, streamed buffers read by a captured graph.
               One row per test as it finishes; the cheap tests run first, the compiles last.
  headline     bench/step_time.py's configurations at CIFAR-10 size (DDPM++, batch 64, bf16):
               DiffRatio eager, VSD eager, DiffRatio's eager step captured as a CUDA graph (no
               compile: the launch savings even when no compile fits), DiffRatio graph (the cold
               whole-step compile), DiffRatio compile, VSD compile; then the ratios and the cost
               model's estimates beside the measurements (bench/results/step_cost_<size>_<precision>.json)
  extra        the kernels' GB/s against the copy (bench/kernel_speed.py), ImageNet-64 ADM and EDM2-XS
               (img512 latents) at batch 32: DiffRatio and VSD eager, DiffRatio's captured eager step

Budget: part i ends at start + the sum of the first i shares of --budget-s (time a part leaves
unused passes to the next). An item whose planned time (PLAN_S) exceeds what is left of its part is
skipped with a row saying so; one that runs past the part's end is interrupted (SIGALRM in this
process, the process group of the pytest child) and recorded as a timeout. A cold compile of the
CIFAR-10 step takes 11-12 minutes as one graph and about 5 network by network, which is what
StepRunner does on a torch that cannot trace the whole step, as 2.11 (the environment row's
``whole_step_traceable``; docs/gpu.md). So the plan skips the compiled configurations;
``--parts headline --try-anyway`` gives a command to them. The machine's lease is separate: give the
device call a limit a minute above --budget-s. A second run on the same warm
machine reuses inductor's (/tmp/torchinductor_<user>) and Triton's (~/.triton/cache) caches, so its
compiles are much shorter.

--dry-run: on the CPU, tiny sizes, fp32, 3 timed steps, a 120 s budget: every part and row kind is
produced; CUDA-only items say "skipped: no CUDA" and the cold compiles are skipped by the plan.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = float(os.environ.get("GPU_CHECK_T0", time.time()))  # the child keeps its parent's clock
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# Share of the budget per part, in order.
PARTS = [("environment", 0.05), ("correctness", 0.40), ("headline", 0.25), ("extra", 0.30)]
# Planned seconds per item: (H100, the CPU dry run at tiny sizes). docs/gpu.md derives the H100
# column from compiles measured here and the cost model's step times: a cold compile of the CIFAR-10
# step takes 11-12 min as one graph, about 5 min network by network (a torch that cannot trace the
# whole step, as 2.11), so the default run skips the compiled configurations.
PLAN_S = {
    "eager": (12, 4), "graph_eager": (12, 4), "graph": (660, 600), "compile": (660, 600), "graph_networks": (330, 600),
    "compile_networks": (330, 600), "graph_warm": (60, 300), "compile_warm": (60, 300), "big_eager": (30, 8),
    "big_graph_eager": (30, 8), "kernels": (30, 3),
}
# pytest runs these files' `gpu` tests; the child orders them by the first matching substring here:
# cheap and decisive first, cold compiles last (unmatched tests run at the end).
TEST_FILES = ["tests/test_step_modes.py", "tests/test_stream.py", "tests/test_no_host_sync.py", "tests/test_kernel_ratio_weighting.py",
              "tests/test_kernel_noise_injection.py", "tests/test_kernel_generator_surrogate.py"]
TEST_ORDER = ["-graph_eager-", "test_stream", "test_no_host_sync", "test_kernel_", "test_graph_mode_replays_the_eager_run"]
# Modules fastratio needs (import name -> wheel) and optional ones that must not be needed here.
NEEDED = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow", "matplotlib": "matplotlib", "triton": "triton",
          "pytest": "pytest (with pluggy, iniconfig, packaging)"}
OPTIONAL = {"pynvml": "nvidia-ml-py", "torch_fidelity": "torch-fidelity", "diffusers": "diffusers", "transformers": "transformers"}
# The dry run's stand-ins for the extra part's networks: the same architectures, tiny.
TINY = {
    "imagenet64": {"shape": (3, 8, 8), "batch": 4, "model": {"arch": "adm", "channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}},
    "img512-xs": {"shape": (4, 8, 8), "batch": 4, "model": {"arch": "edm2", "channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}},
}


class Rows:
    """Appends JSON rows to results.jsonl, each on disk before the next result starts."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def write(self, part: str, item: str, status: str, **fields) -> dict:
        row = {"part": part, "item": item, "status": status, "t_s": round(time.time() - T0, 2), **fields}
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        note = fields.get("reason") or fields.get("error", "")
        print(f"[{row['t_s']:7.1f}s] {part:<12} {item:<48} {status}{' ' + str(note).splitlines()[0][:120] if note else ''}", flush=True)
        return row


class Overrun(BaseException):
    """A part's time is up: raised by SIGALRM in the main thread, a BaseException so that the
    compiler's and trainer's `except Exception` handlers let it through."""


@contextlib.contextmanager
def deadline(at: float):
    def fire(signum, frame):
        raise Overrun

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.time(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def checkout_imports() -> str:
    """Make fastratio importable from this checkout; returns how it was found."""
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))  # after bench/: step_time's `timing` and friends stay first
    try:
        importlib.import_module("fastratio.kernels")
        return "installed"
    except ModuleNotFoundError as err:
        if err.name != "fastratio.kernels":
            raise
    import fastratio

    spec = importlib.util.spec_from_file_location("fastratio.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastratio.kernels"] = module
    spec.loader.exec_module(module)
    fastratio.kernels = module
    return "checkout (kernels/ aliased as fastratio.kernels)"


def _bench_module(name: str):
    """bench/<name>.py by path: bench/kernel_speed.py must not be imported as `kernels` (the repo's kernels/)."""
    if f"bench_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"bench_{name}"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[f"bench_{name}"]  # a later part retries and reports its own failure
            raise
    return sys.modules[f"bench_{name}"]


class Check:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.out = args.out
        self.rows = Rows(args.out / "results.jsonl")
        self.part, self.part_end = "", 0.0
        self.peak_tflops = 1.0
        self.whole_step = True
        self.precision = "bf16" if self.cuda else "fp32"  # CPU inductor code generation fails on some bf16 graphs
        self.steps, self.warmup = (30, 5) if self.cuda else (3, 1)

    def plan(self, kind: str) -> float:
        return PLAN_S[kind][0 if self.cuda else 1]

    def item(self, name: str, kind: str | None, fn, **fields) -> dict | None:
        """Run fn() for one row unless its plan does not fit what is left of the part; its dict
        result becomes the row's fields."""
        left = self.part_end - time.time()
        if kind and self.plan(kind) > left and not (self.args.try_anyway and left > 0):
            self.rows.write(self.part, name, "skipped", reason=f"planned {self.plan(kind):.0f} s, {max(left, 0):.0f} s left of the part's budget", **fields)
            return None
        t = time.time()
        try:
            with deadline(self.part_end):
                result = fn() or {}
        except Overrun:
            self.rows.write(self.part, name, "timeout", reason=f"stopped at the part's end after {time.time() - t:.0f} s", **fields)
            return None
        except Exception as err:  # noqa: BLE001 - a failure is a row; the next item still runs
            self.rows.write(self.part, name, "failed", error=f"{type(err).__name__}: {err}"[:2000], seconds=time.time() - t,
                            traceback=traceback.format_exc()[-4000:], **fields)
            return None
        return self.rows.write(self.part, name, "ok", seconds=round(time.time() - t, 2), **{**result, **fields})

    # -- (a) environment ------------------------------------------------------------------------
    def environment(self) -> None:
        from fastratio.runinfo import git_commit

        torch = self.torch
        info = {"how_fastratio_imports": self.found, "python": sys.version.split()[0], "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "dry_run": self.args.dry_run,
                "cpu_count": os.cpu_count(), "budget_s": self.args.budget_s, "import_s": round(time.time() - T0, 2)}
        info.update(_versions())
        info["commit"] = self.args.commit or git_commit()
        info["missing"] = {mod: f"carry the {wheel} wheel" for mod, wheel in NEEDED.items() if _absent(mod)}
        info["optional_absent"] = sorted(mod for mod in OPTIONAL if _absent(mod))
        info["module_import_failures"] = _import_every_module()
        info["whole_step_traceable"] = self.whole_step = _whole_step_traceable()
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info.update({"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                         "capability": f"{props.major}.{props.minor}", "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20,
                         "cudnn": torch.backends.cudnn.version()})
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        numel = 2**28 if self.cuda else 2**20  # 1 GiB fp32 on the GPU: far beyond L2, the HBM ceiling
        status = "ok"
        try:  # a missing package fails here (step_time imports all of fastratio): the row still says which
            self.peak_tflops = _bench_module("step_time")._matmul_peak_tflops(self.device, dtype)
            info.update(matmul_dtype=str(dtype).removeprefix("torch."), matmul_tflop_s=self.peak_tflops,
                        copy_gb_s=_bench_module("kernel_speed").copy_gb_s(self.device, numel), copy_bytes=2 * 4 * numel)
            # Clocks read after the ceilings, while the GPU is still boosted from them.
            info.update(_clocks(self.device) if self.cuda else {"nvml": "no NVML (CPU)"})
        except Exception as err:  # noqa: BLE001 - recorded in the row
            status, info["error"] = "failed", f"{type(err).__name__}: {err}"[:2000]
        self.rows.write("environment", "environment", status, **info, device=str(self.device))

    # -- (b) correctness ------------------------------------------------------------------------
    def correctness(self) -> None:
        if _absent("pytest"):
            self.rows.write("correctness", "pytest", "skipped", reason=f"pytest missing: {NEEDED['pytest']}")
            return
        env = {**os.environ, "GPU_CHECK_T0": str(T0), "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"}
        env.pop("FASTRATIO_KERNELS", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--pytest-child", str(self.rows.path), "--",
               "-m", "gpu and not slow", "-q", "-p", "no:cacheprovider", *TEST_FILES]
        t = time.time()
        with open(self.out / "pytest.log", "w") as log:
            child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code, status = child.wait(timeout=max(self.part_end - time.time(), 1)), None
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # its inductor compile workers too
                code, status = child.wait(), "timeout"
        tests = [r for r in _read(self.rows.path) if r["part"] == "correctness" and r["item"].startswith("tests/")]
        counts = {s: sum(r["status"] == s for r in tests) for s in ("ok", "failed", "skipped")}
        # pytest: 0 all passed, 1 some failed, 5 none collected or all deselected; anything else broke the run.
        status = status or ("failed" if counts["failed"] or code not in (0, 5) else "ok")
        extra = {"reason": f"pytest stopped at the part's end; {len(tests)} tests reported"} if status == "timeout" else {}
        if status != "ok":
            extra["log_tail"] = (self.out / "pytest.log").read_text(errors="replace")[-3000:]
        self.rows.write("correctness", "summary", status, returncode=code, seconds=round(time.time() - t, 1), tests=len(tests), **counts,
                        log="pytest.log", **extra)

    # -- (c) headline and (d) extra --------------------------------------------------------------
    def steps_at(self, size_name: str, configs: list[tuple[str, str, str]], kinds: dict[str, str]) -> list[dict]:
        """step_time's configurations at one size, one row each; returns the rows that ran."""
        step_time = _bench_module("step_time")
        size = step_time.SIZES["tiny"] if not self.cuda and size_name == "cifar10" else (TINY[size_name] if not self.cuda else step_time.SIZES[size_name])
        done, compiled_once = [], False
        with tempfile.TemporaryDirectory() as tmp:
            fix = step_time.fixtures(Path(tmp), size)
            for name, method, mode in configs:
                fields = {"size": size_name, "shape": list(size["shape"]), "batch": size["batch"], "precision": self.precision,
                          "method": method, "mode": mode}
                if mode.startswith("graph") and not self.cuda:
                    self.rows.write(self.part, f"{size_name}/{name}", "skipped", reason="no CUDA", **fields)
                    continue
                kind = kinds[mode]
                if mode in ("graph", "compile") and method == "diffratio" and compiled_once:
                    kind += "_warm"  # the same step again: inductor's FX graph cache from the first compile
                elif mode in ("graph", "compile") and not self.whole_step:
                    kind += "_networks"  # StepRunner's fallback: each network compiled on its own
                row = self.item(f"{size_name}/{name}", kind, functools.partial(
                    step_time.run_config, name, method, mode, fix, self.precision, self.device, self.steps, self.warmup, self.peak_tflops), **fields)
                if row:
                    done.append(row)
                    compiled_once |= mode in ("graph", "compile") and method == "diffratio"
                self.torch._dynamo.reset()
        return done

    def headline(self) -> None:
        step_time = _bench_module("step_time")
        by_name = {c[0]: c for c in step_time.CONFIGS}
        order = ["b_diffratio_eager", "d_vsd_eager", "a2_diffratio_graph_eager", "a_diffratio_graph", "c_diffratio_compile", "e_vsd_compile"]
        rows = self.steps_at("cifar10", [by_name[n] for n in order], {m: m for m in ("eager", "graph_eager", "graph", "compile")})
        step_time.add_ratios(rows)
        if rows:
            step_time.print_table(rows)
            keys = ("ms_median", "ms_p20", "ms_p80", "images_per_s", "peak_memory_mb", "mfu", "time_vs_vsd_eager", "memory_vs_vsd_eager",
                    "time_vs_diffratio_eager", "compile_s", "capture_s")
            self.rows.write("headline", "table", "ok", rows={r["config"]: {k: r.get(k) for k in keys} for r in rows})
        size = "cifar10" if self.cuda else "tiny"
        path = self.args.cost_model or ROOT / "bench" / "results" / f"step_cost_{size}_{self.precision}.json"
        if not path.is_file():
            self.rows.write("headline", "estimates", "skipped", reason=f"no cost-model rows at {path} (bench/step_cost.py --size {size} writes them)")
            return
        self.item("estimates", None, lambda: estimates(rows, path))

    def extra(self) -> None:
        bench_kernels = _bench_module("kernel_speed")

        def kernels():
            rows = bench_kernels.kernel_rows(64 if self.cuda else 8, [3, 32, 32] if self.cuda else [3, 8, 8], self.device, compiled=self.cuda)
            return {"rows": [{k: r[k] for k in ("op", "impl", "ms_median", "ms_p20", "ms_p80", "gb_s", "speedup_vs_eager", "copy_gb_s")} for r in rows]}

        self.item("kernels", "kernels", kernels)
        by_name = {c[0]: c for c in _bench_module("step_time").CONFIGS}
        configs = [by_name[n] for n in ("b_diffratio_eager", "d_vsd_eager", "a2_diffratio_graph_eager")]
        self.steps, self.warmup = (10, 3) if self.cuda else (3, 1)  # 5-10x the CIFAR step: fewer samples
        for size_name in ("imagenet64", "img512-xs"):
            self.steps_at(size_name, configs, {"eager": "big_eager", "graph_eager": "big_graph_eager"})

    def run(self) -> int:
        self.found = checkout_imports()
        start, end = time.time(), T0 + self.args.budget_s
        parts = [(name, share) for name, share in PARTS if name == "environment" or name in self.args.parts]  # the ceilings always
        share_end = T0
        for name, share in parts:
            share_end += share / sum(s for _, s in parts) * self.args.budget_s
            self.part, self.part_end = name, min(max(share_end, time.time()), end)
            if name != "environment" and time.time() >= end:
                self.rows.write(name, name, "skipped", reason="the budget is spent")
                continue
            try:
                getattr(self, name)()  # each item keeps its part's deadline
            except Exception as err:  # noqa: BLE001 - one broken part must not cost the later ones
                self.rows.write(name, name, "failed", error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
        rows = _read(self.rows.path)
        self.rows.write("summary", "summary", "ok", seconds=round(time.time() - start, 1),
                        counts={s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped", "timeout")})
        return 0


def estimates(rows: list[dict], path: Path) -> dict:
    """The cost model's rows (bench/step_cost.py) beside the measured ones: FLOPs, peak memory and
    time per step, and DiffRatio-to-VSD ratios of each."""
    cost = json.loads(path.read_text())
    cost = cost["rows"] if isinstance(cost, dict) else cost
    model = {r["method"]: r for r in cost if not r.get("checkpointing") and r["method"] in ("diffratio", "vsd")
             and r.get("objective") in (None, "dijs")}
    measured = {r["config"]: r for r in rows}
    pairs = [  # (quantity, measured config, cost-model method, measured key, cost-model key, scale of the cost-model value)
        ("GFLOP/step DiffRatio", "b_diffratio_eager", "diffratio", "flops_per_step", "flops", 1e-9),
        ("GFLOP/step VSD", "d_vsd_eager", "vsd", "flops_per_step", "flops", 1e-9),
        ("peak GB DiffRatio", "b_diffratio_eager", "diffratio", "peak_memory_mb", "peak_bytes", 1e-9),
        ("peak GB VSD", "d_vsd_eager", "vsd", "peak_memory_mb", "peak_bytes", 1e-9),
        ("eager ms DiffRatio", "b_diffratio_eager", "diffratio", "ms_median", "est_ms_eager_h100", 1),
        ("eager ms VSD", "d_vsd_eager", "vsd", "ms_median", "est_ms_eager_h100", 1),
        ("graph ms DiffRatio", "a_diffratio_graph", "diffratio", "ms_median", "est_ms_graph_h100", 1),
        ("graph ms DiffRatio (eager step captured)", "a2_diffratio_graph_eager", "diffratio", "ms_median", "est_ms_graph_h100", 1),
    ]
    to_unit = {"flops_per_step": 1e-9, "peak_memory_mb": 2**20 / 1e9, "ms_median": 1}
    table = []
    for quantity, config, method, key, model_key, scale in pairs:
        got = measured.get(config, {}).get(key)
        want = model.get(method, {}).get(model_key)
        table.append({"quantity": quantity, "estimated": want * scale if want is not None else None,
                      "measured": got * to_unit[key] if got is not None else None})
    by_q = {r["quantity"]: r for r in table}
    for quantity, num, den in [("peak ratio DiffRatio/VSD", "peak GB DiffRatio", "peak GB VSD"),
                               ("FLOPs ratio DiffRatio/VSD", "GFLOP/step DiffRatio", "GFLOP/step VSD"),
                               ("time ratio DiffRatio/VSD eager", "eager ms DiffRatio", "eager ms VSD"),
                               ("time ratio DiffRatio graph/VSD eager", "graph ms DiffRatio", "eager ms VSD"),
                               ("time ratio DiffRatio captured eager step/VSD eager", "graph ms DiffRatio (eager step captured)", "eager ms VSD")]:
        table.append({"quantity": quantity, **{side: by_q[num][side] / by_q[den][side] if by_q[num][side] and by_q[den][side] else None
                                                for side in ("estimated", "measured")}})
    for r in table:
        r["measured_over_estimated"] = r["measured"] / r["estimated"] if r["measured"] and r["estimated"] else None
    print(f"{'quantity':<52} {'estimated':>10} {'measured':>10} {'meas/est':>9}")
    for r in table:
        print(f"{r['quantity']:<52} " + " ".join(f"{r[k]:>{w}.3f}" if r[k] is not None else f"{'-':>{w}}"
                                                  for k, w in (("estimated", 10), ("measured", 10), ("measured_over_estimated", 9))))
    return {"cost_model": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "cost_model_commit": next(iter(model.values()), {}).get("commit"),
            "table": table}


def _whole_step_traceable() -> bool:
    """Can this torch's dynamo trace the step's input-gradient query (fastratio.step's
    _ratio_logit_grad: a detached input made to require grad, then autograd.grad) inside one graph?
    torch 2.11 cannot, so StepRunner compiles each network instead; 2.13 and 2.14 can."""
    import torch

    from fastratio.runner import _tracing_autograd

    def query(x, w):
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad((x_in * w).sin().sum(), x_in)[0]

    try:
        with _tracing_autograd():
            torch.compile(query, fullgraph=True, backend="eager")(torch.randn(3), torch.randn(3))
        return True
    except Exception:  # noqa: BLE001 - dynamo's Unsupported, or an older torch's own error
        return False
    finally:
        torch._dynamo.reset()


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


def _versions() -> dict:
    out = {}
    for mod in ("triton", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            out[mod] = None
    try:  # a copied working tree may have no .git, and the machine no git: --commit says which commit it is
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=True)
        out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        out["dirty"] = None
    return out


def _import_every_module() -> dict[str, str]:
    """Every fastratio module imported: none may need an optional extra to import."""
    import fastratio

    failures = {}
    names = [m.name for m in pkgutil.walk_packages(fastratio.__path__, "fastratio.")]
    names += [f"fastratio.kernels.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "kernels")])]
    for name in sorted(set(names)):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            failures[name] = f"{type(err).__name__}: {err}"[:300]
    return failures


def _clocks(device) -> dict:
    """Driver and clocks: NVML (nvidia-ml-py), else nvidia-smi."""
    out = _bench_module("step_time")._nvml(device)
    if out["nvml"] == "ok":
        return out
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", f"--id={device.index or 0}"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        keys = ("driver", "sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "power_w", "power_limit_w")
        return {**out, "clocks_from": "nvidia-smi", **dict(zip(keys, (v.strip() for v in line.split(","))))}
    except (OSError, subprocess.SubprocessError) as err:
        return {**out, "clocks_from": f"none ({type(err).__name__})", "nvidia_ml_py": "carry the nvidia-ml-py wheel for clocks"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pytest_child(rows_path: Path, args: list[str]) -> int:
    """Run pytest here (fastratio from the checkout), one row per test the moment it finishes."""
    sys.path[0] = str(ROOT)  # as `python -m pytest` from the root: bench/ off the front
    checkout_imports()
    import pytest

    rows = Rows(rows_path)

    class Plugin:
        @staticmethod
        def pytest_collection_modifyitems(items):
            items.sort(key=lambda it: next((i for i, s in enumerate(TEST_ORDER) if s in it.nodeid), len(TEST_ORDER)))

        @staticmethod
        def pytest_runtest_logreport(report):
            if report.when == "call" or report.outcome != "passed":
                status = {"passed": "ok", "failed": "failed", "skipped": "skipped"}[report.outcome]
                fields = {"duration_s": round(report.duration, 2)}
                if report.skipped and isinstance(report.longrepr, tuple):
                    fields["reason"] = report.longrepr[2].removeprefix("Skipped: ")
                if report.failed:
                    fields["error"] = report.longreprtext[-3000:]
                # A skip comes from setup and is the test's one row; a failing setup or teardown is an error of its own.
                error_of = f" ({report.when})" if report.failed and report.when != "call" else ""
                rows.write("correctness", report.nodeid + error_of, status, **fields)

    return pytest.main(args, plugins=[Plugin()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pytest-child"]:
        return pytest_child(Path(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl and pytest.log")
    parser.add_argument("--budget-s", type=float, help="wall seconds from start for the whole command (default 480; 120 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths short of CUDA")
    parser.add_argument("--parts", nargs="+", default=[p for p, _ in PARTS], choices=[p for p, _ in PARTS],
                        help="run only these (environment always runs); the budget is shared among them")
    parser.add_argument("--try-anyway", action="store_true",
                        help="start items whose plan exceeds the time left (a cold compile, say): a timeout row then gives a lower bound")
    parser.add_argument("--commit", help="the checkout's commit, where the copied tree has no .git (default: git rev-parse)")
    parser.add_argument("--cost-model", type=Path, help="cost-model rows to compare (default bench/results/step_cost_<size>_<precision>.json)")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (120.0 if args.dry_run else 480.0)
    args.out = args.out.resolve()  # the pytest child runs from the repository's root
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the dry run is the CPU path, GPU or not
        # Tiny steps are dispatch-bound: a second intra-op thread only spins, ten times slower on a busy machine.
        os.environ["OMP_NUM_THREADS"] = "1"
    return Check(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
