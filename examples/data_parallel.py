"""Data-parallel training on a JAX cluster of several processes (one machine, loopback).

Each process owns ``--devices-per-process`` CPU devices; together they form
one global mesh with a ``"data"`` axis. Parameters and optimizer state are
replicated, every process feeds its own slice of each global batch, and a
``jit``-compiled step computes the global mean gradient with collectives
(gloo on CPU) before the optimizer runs. The same steps are then repeated by
a single process that owns all devices, and the script reports how far the
parameters of every process are from each other and from that reference.

    python examples/data_parallel.py                          # 2 processes x 2 devices
    python examples/data_parallel.py --processes 4 --optimizers adam sigma_filter
    python examples/data_parallel.py --parallel pmap          # jax.pmap across processes

Every process also records whether it used bayesopt_jax's native CPU
kernels: all processes must make the same choice, or their replicas drift.

On a real multi-host cluster the worker part runs unchanged: replace the
loopback coordinator address by the address of process 0 (or let
``jax.distributed.initialize()`` read it from the cluster environment).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

OPTIMIZERS = [
    "adam",
    "adamw",
    "amsgrad",
    "adamax",
    "rmsprop",
    "adagrad",
    "sigma_filter",
    "sigma_fixed_point",
]


def make_optimizer(name: str, lr: float):
    import bayesopt_jax as bj

    return {
        "adam": lambda: bj.adam(lr),
        "adamw": lambda: bj.adamw(lr, weight_decay=1e-4),
        "amsgrad": lambda: bj.amsgrad(lr),
        "adamax": lambda: bj.adamax(2 * lr),
        "rmsprop": lambda: bj.rmsprop(lr, decay=0.99),
        "adagrad": lambda: bj.adagrad(10 * lr),
        "sigma_filter": lambda: bj.sigma_filter(lr, b1=0.9),
        "sigma_fixed_point": lambda: bj.sigma_fixed_point(lr, b1=0.9),
    }[name]()


# --------------------------------------------------------------------------
# worker: one process of the cluster
# --------------------------------------------------------------------------


def load_data(dtype):
    """scikit-learn's digits: pixels scaled to [0, 1], integer labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(dtype), data.target.astype(np.int32)


def batch_indices(seed: int, steps: int, batch_size: int, num_examples: int):
    """The rows of every global batch (the same in every process)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, num_examples, (steps, batch_size))


def init_params(key, hidden: int, dtype):
    """A 64-``hidden``-10 tanh MLP."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sizes = [64, hidden, 10]
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b), dtype) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), dtype)
    return params


def loss_fn(params, x, y):
    """Mean softmax cross-entropy of the MLP."""
    import jax.numpy as jnp
    import optax

    h = jnp.tanh(x @ params["w0"] + params["b0"])
    logits = h @ params["w1"] + params["b1"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def worker(args) -> None:
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )

    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bayesopt_jax as bj

    dtype = np.float64 if args.x64 else np.float32
    rank, nproc = jax.process_index(), jax.process_count()
    if args.batch_size % jax.device_count():
        raise SystemExit(f"--batch-size must be a multiple of {jax.device_count()} devices")
    x_all, y_all = load_data(dtype)
    # Each process feeds the rows of the global batch that live on its devices.
    local = slice(rank * args.batch_size // nproc, (rank + 1) * args.batch_size // nproc)
    order = batch_indices(args.seed, args.steps, args.batch_size, len(x_all))

    if args.parallel == "jit":
        # One global mesh; parameters replicated, the batch split over "data".
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P("data"))

        def global_batch(step):
            idx = order[step][local]
            x = jax.make_array_from_process_local_data(batch_sharding, x_all[idx])
            y = jax.make_array_from_process_local_data(batch_sharding, y_all[idx])
            return x, y

        def setup(tx, params):
            params = jax.device_put(params, replicated)
            return tx, params, jax.jit(tx.init)(params)

        def compile_step(tx):
            @jax.jit
            def step(params, state, x, y):
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state, loss

            return step

        def host_copies(params):
            return [
                {k: np.asarray(s.data) for k, s in zip(params, shards, strict=True)}
                for shards in zip(*(v.addressable_shards for v in params.values()), strict=True)
            ]
    else:
        # pmap over this process's devices; the mean over every device of
        # every process is bj.cross_replica_mean's pmean.
        n_local = jax.local_device_count()

        def global_batch(step):
            idx = order[step][local]
            return (
                x_all[idx].reshape(n_local, -1, x_all.shape[-1]),
                y_all[idx].reshape(n_local, -1),
            )

        def setup(tx, params):
            tx = optax.chain(bj.cross_replica_mean("data"), tx)
            # one copy per local device along a leading axis; pmap places them
            params = jax.tree.map(lambda a: np.broadcast_to(a, (n_local, *a.shape)), params)
            return tx, params, jax.pmap(tx.init)(params)

        def compile_step(tx):
            def step(params, state, x, y):
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state, jax.lax.pmean(loss, "data")

            return jax.pmap(step, axis_name="data")

        def host_copies(params):
            return [{k: np.asarray(v[i]) for k, v in params.items()} for i in range(n_local)]

    results = {}
    for name in args.optimizers:
        tx, params, state = setup(
            make_optimizer(name, args.lr),
            init_params(jax.random.key(args.seed), args.hidden, dtype),
        )
        step = compile_step(tx)
        losses = []
        start = time.perf_counter()
        for t in range(args.steps):
            params, state, loss = step(params, state, *global_batch(t))
            losses.append(float(np.ravel(np.asarray(loss))[0]))
        elapsed = time.perf_counter() - start
        # Replicated parameters: every local device holds a full copy.
        copies = host_copies(params)
        for other in copies[1:]:
            for k, v in other.items():
                if not np.array_equal(v, copies[0][k]):
                    raise RuntimeError(f"{name}: local replicas of {k} differ")
        np.savez(args.out / f"{name}_{args.tag}_p{rank}.npz", **copies[0])
        results[name] = {"losses": losses, "seconds": elapsed}

    native = {"available": bj.native_available(), "reason": bj.native_status()["reason"]}
    (args.out / f"native_{args.tag}_p{rank}.json").write_text(json.dumps(native))
    if rank == 0:
        (args.out / f"losses_{args.tag}.json").write_text(json.dumps(results))
    if args.processes > 1:
        jax.distributed.shutdown()


# --------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, processes: int, devices: int, tag: str) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    common = [
        sys.executable,
        __file__,
        "--worker",
        "--processes",
        str(processes),
        "--port",
        str(port),
        "--tag",
        tag,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--hidden",
        str(args.hidden),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--out",
        str(args.out),
        "--parallel",
        args.parallel,
        "--optimizers",
        *args.optimizers,
    ] + (["--x64"] if args.x64 else [])
    procs = [subprocess.Popen([*common, "--process-id", str(i)], env=env) for i in range(processes)]
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"{tag}: worker exit codes {codes}")


def compare(out: Path, optimizers: list[str], processes: int, reference: bool = True) -> dict:
    """Max |difference| between processes and against the single-process run."""
    import numpy as np

    report = {}
    for name in optimizers:
        runs = [np.load(out / f"{name}_cluster_p{i}.npz") for i in range(processes)]
        keys = runs[0].files
        between = (
            max(float(np.max(np.abs(r[k] - runs[0][k]))) for r in runs[1:] for k in keys)
            if processes > 1
            else 0.0
        )
        report[name] = {"between_processes": between}
        if reference:
            single = np.load(out / f"{name}_single_p0.npz")
            report[name]["vs_single_process"] = max(
                float(np.max(np.abs(runs[0][k] - single[k]))) for k in keys
            )
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=2)
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x64", action="store_true", help="float64 parameters and state")
    ap.add_argument(
        "--parallel",
        choices=["jit", "pmap"],
        default="jit",
        help="sharded jit over a global mesh, or pmap with bayesopt_jax.cross_replica_mean",
    )
    ap.add_argument(
        "--no-reference", action="store_true", help="skip the single-process reference run"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per cluster run")
    ap.add_argument("--out", type=Path, default=Path("outputs/data_parallel"))
    # internal: set by the launcher for each worker process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="cluster", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args)
        return {}

    args.out.mkdir(parents=True, exist_ok=True)
    devices = args.processes * args.devices_per_process
    print(f"cluster: {args.processes} processes x {args.devices_per_process} CPU devices")
    _launch(args, args.processes, args.devices_per_process, "cluster")
    if not args.no_reference:
        print(f"reference: 1 process x {devices} CPU devices")
        _launch(args, 1, devices, "single")

    report = compare(args.out, args.optimizers, args.processes, not args.no_reference)
    losses = json.loads((args.out / "losses_cluster.json").read_text())
    native = [
        json.loads((args.out / f"native_cluster_p{i}.json").read_text())
        for i in range(args.processes)
    ]
    print("native kernels per process: " + ", ".join(str(n["available"]) for n in native))
    print(
        f"\n{'optimizer':<18} {'first loss':>10} {'final loss':>10} "
        f"{'max |Δ| procs':>14} {'max |Δ| vs 1 proc':>18}"
    )
    for name, r in report.items():
        curve = losses[name]["losses"]
        r["first_loss"], r["final_loss"] = curve[0], curve[-1]
        vs = r.get("vs_single_process")
        print(
            f"{name:<18} {curve[0]:>10.4f} {curve[-1]:>10.4f} "
            f"{r['between_processes']:>14.3g} {'-' if vs is None else f'{vs:.3g}':>18}"
        )
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
