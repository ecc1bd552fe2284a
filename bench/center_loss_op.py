"""Benchmark one center-loss training step: forward + backward + center update.

Compares, in the same run and on the same inputs:
  (a) ours      ``training.center_loss.CenterLoss`` (buffer + sparse Eq. 4 update)
  (b) distmat   B×C distance-matrix loss, centers an nn.Parameter + SGD(lr=α)
  (c) article   the article's ``CenterlossFunc``, centers an nn.Parameter + SGD(lr=α)

Each (method, B, C, D) is measured in fresh subprocesses: the median wall time of a step (first step
excluded, at most ``--repeats`` steps or ``--budget-s`` seconds), and, in a second process, the peak
memory 2 steps add on top of the set-up state (inputs, centers, modules). CPU: peak resident set size
(VmHWM reset through /proc/self/clear_refs just before the steps; fallback: the increase of
ru_maxrss) with a fixed malloc mmap threshold, see ``worker``. CUDA: torch.cuda.max_memory_allocated.
It also checks that (a) and (c) give the same loss ((c) scaled to a mean) and center update, and how
far (b) and (a) are from an fp64 truth under bf16 autocast.

    python -m bench.center_loss_op --device cpu --markdown /tmp/center_loss_bench.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.reference_losses import ArticleCenterLoss, DistMatCenterLoss  # noqa: E402
from training.center_loss import CenterLoss  # noqa: E402

CASES = [(128, 10, 2), (256, 10_000, 512), (512, 100_000, 512)]
METHODS = ("ours", "distmat", "article")
ALPHA = 0.5


def make_inputs(b: int, c: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    return x, y


def make_step(method: str, c: int, d: int, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Return a closure doing one full training step of the center loss alone (features are a leaf
    standing in for the embedding output). Centers start N(0,1), filled in place (no transient copy)."""
    feats = x.clone().requires_grad_()
    if method == "ours":
        mod = CenterLoss(c, d, alpha=ALPHA).to(x.device)
        mod.centers.normal_()

        def step() -> torch.Tensor:
            feats.grad = None
            loss = mod(feats, y)  # forward + Eq. 4 update
            loss.backward()
            return loss

        return step
    mod = (DistMatCenterLoss(c, d) if method == "distmat" else ArticleCenterLoss(c, d, mean=True)).to(x.device)
    with torch.no_grad():
        mod.centers.normal_()
    opt = torch.optim.SGD(mod.parameters(), lr=ALPHA)

    def step() -> torch.Tensor:
        feats.grad = None
        opt.zero_grad(set_to_none=True)
        loss = mod(feats, y)
        loss.backward()
        opt.step()
        return loss

    return step


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); return the current RSS in KiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kb("VmRSS")
    except OSError:
        return None


def worker(method: str, b: int, c: int, d: int, device: str, repeats: int, budget_s: float, mem: bool) -> dict:
    """Time (``mem=False``) or measure peak memory (``mem=True``) of one method on one case.

    Memory and time are measured in different processes because exact peak-RSS accounting needs a
    fixed malloc mmap threshold (set by the parent through MALLOC_MMAP_THRESHOLD_=65536: every block
    ≥ 64 KiB is its own mapping, unmapped when freed, so VmHWM follows the live bytes), and mapping
    and unmapping every buffer would distort the timings.
    """

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # page in the code paths (kernels, autograd engine, optimizer) on a tiny problem first, so the
    # memory measured below is the step's data, not first-use overheads
    make_step(method, 4, 4, *make_inputs(8, 4, 4, device))()
    x, y = make_inputs(b, c, d, device)
    step = make_step(method, c, d, x, y)
    sync()
    if mem:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base_rss = _reset_peak_rss()
            base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        step()
        if time.perf_counter() - t0 < budget_s / 2:  # a 2nd step covers anything allocated lazily
            step()
        sync()
        if device == "cuda":
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif base_rss is not None:
            peak_mib = (_rss_kb("VmHWM") - base_rss) / 1024
        else:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_max) / 1024
        return {"peak_mib": max(peak_mib, 0.0)}

    times = []
    t_start = time.perf_counter()
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    # the first step is a warm-up (allocator growth, lazy init); keep it only if it is all we have
    times = times[1:] or times
    return {"ms": 1e3 * statistics.median(times), "n": len(times)}


def run_worker(method: str, case: tuple[int, int, int], args: argparse.Namespace) -> dict:
    result = {}
    for mem in (False, True):
        cmd = [
            sys.executable, "-m", "bench.center_loss_op", "--worker", method, *map(str, case),
            "--device", args.device, "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
            "--threads", str(args.threads),
        ]  # fmt: skip
        env = dict(os.environ)
        if mem:
            cmd.append("--mem")
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


@torch.no_grad()
def _truth(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> float:
    return float(0.5 * (x.double() - centers.double()[y]).pow(2).sum(1).mean())


def check_case(b: int, c: int, d: int, device: str) -> dict:
    """(a) vs (c): loss and center update from the same start; bf16 error of (a) and (b)."""
    x, y = make_inputs(b, c, d, device, seed=1)
    c0 = torch.randn(c, d, generator=torch.Generator().manual_seed(2)).to(device)
    ours = CenterLoss(c, d, alpha=ALPHA).to(device)
    ours.centers.copy_(c0)
    art = ArticleCenterLoss(c, d, mean=True).to(device)
    dm = DistMatCenterLoss(c, d).to(device)
    with torch.no_grad():
        art.centers.copy_(c0)
        dm.centers.copy_(c0)
    opt = torch.optim.SGD(art.parameters(), lr=ALPHA)
    loss_a = ours(x, y)
    loss_c = art(x, y)
    loss_c.backward()
    opt.step()
    res = {
        "loss_rel_diff": abs(loss_a.item() - loss_c.item()) / abs(loss_c.item()),
        "centers_max_abs_diff": float((ours.centers - art.centers.detach()).abs().max()),
    }
    # bf16 autocast vs fp64 truth, for random centers and for "converged" ones (x_i = c_yi + 0.1·noise),
    # where ‖x‖² + ‖c‖² − 2x·c cancels catastrophically
    xs = {
        "random": x,
        "converged": c0[y] + 0.1 * torch.randn(b, d, generator=torch.Generator().manual_seed(3)).to(device),
    }
    ours.eval()
    ours.centers.copy_(c0)  # the step above moved them
    for name, xx in xs.items():
        truth = _truth(xx, y, c0)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            res[f"bf16_rel_err_distmat_{name}"] = abs(float(dm(xx, y)) - truth) / truth
            res[f"bf16_rel_err_ours_{name}"] = abs(float(ours(xx, y)) - truth) / truth
    return res


def machine(device: str) -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"nproc {len(os.sched_getaffinity(0))}, {cpu}{gpu}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per case (after 1 warm-up step)")
    p.add_argument(
        "--budget-s", type=float, default=10.0, help="stop a case once this many seconds are spent (min 1 timed step)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each worker")
    p.add_argument("--quick", action="store_true", help="10 repeats, 3 s budget per case, skip the C=100000 case")
    p.add_argument("--markdown", type=Path, help="write the result tables to this file")
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "B", "C", "D"), help=argparse.SUPPRESS)
    p.add_argument("--mem", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.budget_s = min(args.repeats, 10), min(args.budget_s, 3.0)
    if args.worker:
        method, *bcd = args.worker
        print(json.dumps(worker(method, *map(int, bcd), args.device, args.repeats, args.budget_s, args.mem)))
        return

    t_run = time.perf_counter()
    rows = [
        "| B | C | D | method | median ms/step | peak MiB | steps | time vs ours | memory vs ours |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    checks, goals = {}, []
    for case in CASES[:2] if args.quick else CASES:
        res = {m: run_worker(m, case, args) for m in METHODS}
        ours = res["ours"]
        for m, r in res.items():
            # RSS moves in 4 KiB pages and malloc reuses small freed blocks: below ~0.1 MiB a ratio
            # would only measure noise
            mem = f"{r['peak_mib'] / ours['peak_mib']:.1f}×" if ours["peak_mib"] >= 0.1 else "n/a"
            rows.append(
                f"| {case[0]} | {case[1]} | {case[2]} | {m} | {r['ms']:.3f} | {r['peak_mib']:.2f} | {r['n']} "
                f"| {r['ms'] / ours['ms']:.2f}× | {mem} |"
            )
            print(rows[-1], flush=True)
        checks[case] = check_case(*case, args.device)
        print(f"  ({time.perf_counter() - t_run:.0f} s so far)", file=sys.stderr, flush=True)
        dm, art = res["distmat"], res["article"]
        if case[1] == 10:
            goals.append(
                ("C=10: (a) within 1.2× of (c) time", f"{ours['ms'] / art['ms']:.2f}×", ours["ms"] <= 1.2 * art["ms"])
            )
        if case[1] == 10_000:
            goals.append(
                ("C=10000: (a) ≥ 50× faster than (b)", f"{dm['ms'] / ours['ms']:.0f}×", dm["ms"] >= 50 * ours["ms"])
            )
            mem_ratio = dm["peak_mib"] / max(ours["peak_mib"], 1e-9)
            goals.append(("C=10000: (a) ≥ 100× less peak memory than (b)", f"{mem_ratio:.0f}×", mem_ratio >= 100))
            goals.append(("C=10000: (a) faster than (c)", f"{art['ms'] / ours['ms']:.0f}×", ours["ms"] < art["ms"]))

    check_lines = [
        "| B | C | D | loss rel diff (a) vs (c) | centers max abs diff (a) vs (c) "
        "| bf16 rel err (b) random | bf16 rel err (b) converged "
        "| bf16 rel err (a) random | bf16 rel err (a) converged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (b, c, d), ch in checks.items():
        check_lines.append(
            f"| {b} | {c} | {d} | {ch['loss_rel_diff']:.1e} | {ch['centers_max_abs_diff']:.1e} "
            f"| {ch['bf16_rel_err_distmat_random']:.1e} | {ch['bf16_rel_err_distmat_converged']:.1e} "
            f"| {ch['bf16_rel_err_ours_random']:.1e} | {ch['bf16_rel_err_ours_converged']:.1e} |"
        )
    worst = max(max(ch["loss_rel_diff"], ch["centers_max_abs_diff"]) for ch in checks.values())
    goals.append(("(a) and (c) same loss and center update (≤ 1e-5)", f"{worst:.1e}", worst <= 1e-5))
    goal_lines = ["| goal | measured | met |", "|---|---:|---|"]
    goal_lines += [f"| {g} | {v} | {'yes' if ok else 'NO'} |" for g, v, ok in goals]
    print("\n" + "\n".join(check_lines) + "\n\n" + "\n".join(goal_lines))
    print(f"total {time.perf_counter() - t_run:.0f} s", file=sys.stderr)

    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        head = (
            f"Machine: {machine(args.device)}; device {args.device}, {args.threads} torch thread(s) per worker, "
            f"repeats {args.repeats}, budget {args.budget_s:g} s per case.\n\n"
        )
        tables = ["\n".join(rows), "\n".join(check_lines), "\n".join(goal_lines)]
        args.markdown.write_text(head + "\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
