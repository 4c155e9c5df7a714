"""Train a byte-level transformer language model on the Python standard library's source text.

Every Python installation ships the text: the ``.py`` files of its standard
library (found with ``sysconfig``; test suites and site-packages left out).
Files are split once into training and validation sets by a hash of their
path, so the split does not depend on the machine or the run. The model is a
decoder-only transformer in Flax NNX (learned token and position embeddings,
pre-norm blocks of causal multi-head attention and a GELU MLP, a final layer
norm and an untied output layer); bytes are the tokens (vocabulary 256).

Each optimizer trains the same model from the same initialisation on the same
batches. Training is data-parallel over ``--devices`` devices (one ``"data"``
mesh axis, the batch split over it, parameters replicated) with the optimizer
state sharded ZeRO-style: every state array that mirrors a parameter is split
over the data axis along its first dimension the device count divides
(``bayesopt_jax.state_shardings(..., split_over="data")``; 8-bit states only
where every block stays on one device). Orbax checkpoints are written every ``--checkpoint-every`` steps
and ``--resume`` continues from the last one, bit for bit.

    python examples/train_lm.py                                   # ~6 min on 2 CPU cores
    python examples/train_lm.py --devices 8                       # 8 simulated CPU devices
    python examples/train_lm.py --processes 2 --devices 4         # a 2-process cluster
    python examples/train_lm.py --optimizers adamw --steps 5000 --d-model 512 --layers 8
    python examples/train_lm.py --resume                          # after an interruption

On a multi-host cluster (SLURM, TPU pods, ...) every host runs the same
command with ``--distributed``: ``jax.distributed.initialize()`` finds the
coordinator in the cluster's environment; the checkpoint directory must be
one that every host sees.

It prints a progress bar (loss, tokens/s), a validation table (loss in nats
per byte and bits per byte, tokens/s, compile time, optimizer-state bytes per
parameter), a sample of generated text per optimizer, and writes
``results.json`` and ``loss_curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bayesopt_jax as bj

OPTIMIZERS = (
    "adamw",
    "adam",
    "amsgrad",
    "rmsprop",
    "sigma_filter",
    "sigma_fixed_point",
    "variational_sigma_filter",
    "variational_newton",
)
EIGHT_BIT = (
    "adamw",
    "adam",
    "amsgrad",
    "sigma_filter",
    "sigma_fixed_point",
    "variational_sigma_filter",
)
DEFAULT_OPTIMIZERS = ("adamw", "sigma_filter", "variational_sigma_filter")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def is_validation_file(relative_path: str, fraction: float) -> bool:
    """The fixed split: a file is for validation when a hash of its path says so."""
    return zlib.crc32(relative_path.encode()) % 1000 < 1000 * fraction


def load_corpus(val_fraction: float, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The standard library's ``.py`` files as two byte arrays (training, validation).

    Files are concatenated in sorted path order, each followed by a blank line.
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        text = path.read_bytes() + b"\n\n"
        (val if is_validation_file(rel.as_posix(), val_fraction) else train).append(text)
    if not train or not val:
        raise SystemExit(f"no Python source found under {root}")
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)  # noqa: E731
    return as_array(train), as_array(val)


def batch_starts(seed: int, step: int, batch_size: int, n: int, seq_len: int) -> np.ndarray:
    """Where the windows of global batch ``step`` start: a function of (seed, step) only.

    No generator state is carried from step to step, so a resumed run reads
    exactly the batches the uninterrupted run would have read.
    """
    return np.random.default_rng([seed, step]).integers(0, n - seq_len - 1, batch_size)


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """``seq_len + 1`` bytes from each start, as int32 tokens."""
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    vocab: int = 256
    seq_len: int = 128
    d_model: int = 128
    heads: int = 4
    layers: int = 6
    mlp_ratio: int = 4


class Block(nnx.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            cfg.heads, d, decode=False, keep_rngs=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x), is_causal=True)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.tokens = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.positions = nnx.Embed(cfg.seq_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(cfg: Config, seed: int):
    """``(graphdef, params)``: the module's structure and its parameters (a dict of NumPy arrays)."""
    graphdef, state = nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    return graphdef, jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def next_byte_loss(graphdef, params, tokens):
    """Mean cross-entropy (nats per byte) of predicting ``tokens[:, 1:]`` from what precedes."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()


# --------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------


def warmup_cosine(args, peak: float = 1.0) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``--warmup`` steps, cosine decay to ``--final-fraction`` of it."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, args.warmup, max(args.steps, args.warmup + 1), peak * args.final_fraction
    )


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(name: str, args, num_data: int, tokens_per_step: int):
    """``clip_by_global_norm`` followed by the named optimizer under the warm-up schedule.

    The Adam family takes the schedule as its learning rate (the Optax way).
    The σ-filters' η sets both the step and how fast σ may grow (at most η²
    per step), so η stays constant and the schedule scales the step that
    comes out of the filter instead: a warm-up starting at η = 0 would hold
    σ near 0 for about 1/(η√ŝ) steps.
    """
    lr = warmup_cosine(args, args.lr)
    clip = optax.clip_by_global_norm(args.clip)
    after = optax.scale_by_schedule(warmup_cosine(args))
    wd = dict(weight_decay=args.weight_decay, mask=decay_mask)
    st = {}
    if args.state_dtype == "8bit":
        if name not in EIGHT_BIT:
            raise ValueError(f"--state-dtype 8bit: supported by {', '.join(EIGHT_BIT)}, not {name}")
        fmt = bj.Blockwise8()
        st = dict(mu_dtype=fmt, nu_dtype=fmt)
        if "sigma" in name:
            st["sigma_dtype"] = fmt
    if name == "adamw":
        return optax.chain(clip, bj.adamw(lr, b2=args.b2, **wd, **st))
    if name == "adam":
        return optax.chain(clip, bj.adam(lr, b2=args.b2, **st))
    if name == "amsgrad":
        return optax.chain(clip, bj.amsgrad(lr, b2=args.b2, **st))
    if name == "rmsprop":
        return optax.chain(clip, bj.rmsprop(lr, decay=args.b2))
    if name == "sigma_filter":
        return optax.chain(clip, bj.sigma_filter(args.lr, beta=args.b2, b1=0.9, **st), after)
    if name == "sigma_fixed_point":
        fixed = bj.sigma_fixed_point(args.lr, beta=args.b2, b1=0.9, **st)
        return optax.chain(clip, fixed, after)
    if name == "variational_sigma_filter":
        return optax.chain(
            clip,
            bj.variational_sigma_filter(
                args.lr,
                num_data=num_data / args.temperature,
                batch_size=tokens_per_step,
                key=args.seed,
                beta=args.b2,
                **st,
            ),
            after,
        )
    if name == "variational_newton":
        # η is the proximal σ-filter's; the step is the whole natural-gradient
        # step (α = 1) under the warm-up and cosine decay, as for the σ-filters.
        return optax.chain(
            clip,
            bj.variational_newton(
                num_data=num_data / args.temperature,
                batch_size=tokens_per_step,
                key=args.seed,
                proximal_eta=args.lr,
                beta=args.b2,
            ),
            after,
        )
    raise ValueError(f"--optimizers: unknown name {name!r}; choose from {', '.join(OPTIMIZERS)}")


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def host_value(x) -> np.ndarray:
    """A replicated (or this process's) value as a NumPy array, in any process."""
    return np.asarray(x.addressable_data(0))


def fingerprint(tree) -> str:
    """A hash of every value in the tree (equal fingerprints: bit-identical trees)."""
    digest = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        digest.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return digest.hexdigest()[:16]


def state_bytes(state) -> tuple[int, int]:
    """Bytes of the optimizer state: in total, and held by this process's first device."""
    leaves = jax.tree.leaves(state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    device = jax.local_devices()[0]
    first = sum(
        s.data.size * s.data.dtype.itemsize
        for x in leaves
        for s in x.addressable_shards
        if s.device == device
    )
    return total, first


class Trainer:
    """One optimizer's run: the compiled step and evaluation, checkpoints, history."""

    def __init__(self, name: str, args, data, mesh, graphdef, params0):
        self.name, self.args, self.mesh, self.graphdef = name, args, mesh, graphdef
        self.train_data, self.val_data = data
        self.rank, self.nproc = jax.process_index(), jax.process_count()
        seq, batch = args.seq_len, args.batch_size
        self.tx = make_optimizer(name, args, len(self.train_data), batch * seq)

        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), params0
        )
        self.param_shardings = jax.tree.map(lambda a: a.sharding, abstract)
        self.state_shardings = bj.state_shardings(self.tx, abstract, split_over="data")
        self.abstract_params = abstract
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(self.tx.init, abstract),
            self.state_shardings,
        )
        self.params = jax.device_put(params0, self.param_shardings)
        self.state = jax.jit(self.tx.init, out_shardings=self.state_shardings)(self.params)
        # Variational training takes each gradient at a posterior draw.
        self.at_draws = any(
            isinstance(s, bj.ScaleByVariationalSigmaFilterState)
            for s in jax.tree.leaves(
                self.state, is_leaf=lambda s: isinstance(s, bj.ScaleByVariationalSigmaFilterState)
            )
        )

        t0 = time.perf_counter()
        tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=self.batch_sharding)
        self.step_fn = (
            jax.jit(
                self._train_step,
                in_shardings=(self.param_shardings, self.state_shardings, self.batch_sharding),
                out_shardings=(
                    self.param_shardings,
                    self.state_shardings,
                    self.replicated,
                    self.replicated,
                ),
                donate_argnums=(0, 1),
            )
            .lower(self.abstract_params, self.abstract_state, tokens)
            .compile()
        )
        self.compile_seconds = time.perf_counter() - t0
        self.eval_fn = jax.jit(
            lambda p, t: next_byte_loss(graphdef, p, t), out_shardings=self.replicated
        )
        self.history = {"step": [], "train_loss": [], "grad_norm": [], "val": []}
        self.step = 0
        self.train_seconds = 0.0
        self.manager = None

    # -- the step ----------------------------------------------------------

    def _train_step(self, params, state, tokens):
        at = bj.training_sample(params, state) if self.at_draws else params
        loss, grads = jax.value_and_grad(next_byte_loss, argnums=1)(self.graphdef, at, tokens)
        updates, state = self.tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, optax.global_norm(grads)

    def global_batch(self, rows: np.ndarray):
        """A global array from this process's rows of the batch."""
        b = len(rows)
        local = rows[self.rank * b // self.nproc : (self.rank + 1) * b // self.nproc]
        return jax.make_array_from_process_local_data(self.batch_sharding, local, rows.shape)

    def train_batch(self, step: int):
        a = self.args
        starts = batch_starts(a.seed, step, a.batch_size, len(self.train_data), a.seq_len)
        return self.global_batch(windows(self.train_data, starts, a.seq_len))

    def validation_loss(self) -> float:
        """Mean loss over fixed validation windows (the same every time)."""
        a = self.args
        n = len(self.val_data) - a.seq_len - 1
        starts = np.random.default_rng([a.seed, 2**31]).integers(0, n, a.val_batches * a.batch_size)
        losses = [
            host_value(
                self.eval_fn(self.params, self.global_batch(windows(self.val_data, s, a.seq_len)))
            )
            for s in np.split(starts, a.val_batches)
        ]
        return float(np.mean(losses))

    # -- checkpoints -------------------------------------------------------

    def open_checkpoints(self, directory: Path):
        import orbax.checkpoint as ocp

        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2, save_interval_steps=self.args.checkpoint_every
            ),
        )

    def save(self, force: bool = False):
        import orbax.checkpoint as ocp

        meta = {
            "history": self.history,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds,
        }
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": self.params, "opt_state": self.state}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore_latest(self) -> bool:
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return False
        target = {"params": self.abstract_params, "opt_state": self.abstract_state}
        back = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        self.params, self.state = back["state"]["params"], back["state"]["opt_state"]
        self.history = back["meta"]["history"]
        self.train_seconds = back["meta"]["train_seconds"]
        self.step = step
        return True

    # -- the loop ----------------------------------------------------------

    def run(self, progress):
        """Train to ``--steps``, reading losses back every ``--log-every`` steps.

        Steps are dispatched without waiting for their results, so an
        accelerator can run ahead of Python by up to ``--log-every`` steps;
        evaluations and checkpoints see a complete history.
        """
        a = self.args
        tokens_per_step = a.batch_size * a.seq_len
        progress.reset(total=a.steps)
        progress.update(self.step)
        progress.set_description(self.name)
        progress.set_postfix_str("")
        pending = []
        while self.step < a.steps:
            t0 = time.perf_counter()
            batch = self.train_batch(self.step)
            self.params, self.state, loss, gnorm = self.step_fn(self.params, self.state, batch)
            pending.append((loss, gnorm))
            self.step += 1
            evaluate = self.step % a.eval_every == 0 or self.step == a.steps
            save = self.manager is not None and (
                self.step == a.steps or self.manager.should_save(self.step)
            )
            if evaluate or save or self.step % a.log_every == 0 or self.step == a.crash_at:
                self.record(pending)
                progress.update(len(pending))
                pending = []
            self.train_seconds += time.perf_counter() - t0
            if evaluate:
                self.history["val"].append([self.step, self.validation_loss()])
            if save:
                self.save(force=self.step == a.steps)
            if self.step == a.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # an abrupt end, for testing --resume
            if not pending:
                timed = len(self.history["train_loss"])
                rate = tokens_per_step * timed / max(self.train_seconds, 1e-9)
                loss = self.history["train_loss"][-1]
                progress.set_postfix(loss=f"{loss:.3f}", tokens_s=f"{rate:,.0f}")
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()

    def record(self, pending):
        """Appends the losses of the steps just run to the history (waits for them)."""
        first = self.step - len(pending) + 1
        for n, (loss, gnorm) in enumerate(pending):
            loss, gnorm = float(host_value(loss)), float(host_value(gnorm))
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss {loss} at step {first + n}")
            self.history["step"].append(first + n)
            self.history["train_loss"].append(loss)
            self.history["grad_norm"].append(gnorm)

    def summary(self) -> dict:
        a = self.args
        n_params = sum(x.size for x in jax.tree.leaves(self.params))
        total, first = state_bytes(self.state)
        tail = self.history["train_loss"][-min(50, len(self.history["train_loss"])) :]
        val = self.history["val"][-1][1]
        return {
            "optimizer": self.name,
            "val_loss": val,
            "val_bits_per_byte": val / math.log(2),
            "train_loss_last50": float(np.mean(tail)),
            "tokens_per_second": a.batch_size
            * a.seq_len
            * len(self.history["train_loss"])
            / max(self.train_seconds, 1e-9),
            "compile_seconds": self.compile_seconds,
            "parameters": int(n_params),
            "parameter_arrays": len(jax.tree.leaves(self.params)),
            "state_bytes_per_param": total / n_params,
            "state_bytes_per_param_per_device": first / n_params,
            "params_fingerprint": fingerprint(self.params),
            "state_fingerprint": fingerprint(self.state),
            "history": self.history,
        }

    # -- text --------------------------------------------------------------

    def generate(self, prompt: bytes, length: int, temperature: float, seed: int) -> str:
        """Sampled continuation of ``prompt`` (the mean parameters, a sliding window)."""
        seq = self.args.seq_len
        graphdef = self.graphdef

        @jax.jit
        def logits_at(params, window, position):
            return nnx.merge(graphdef, params)(window[None])[0, position]

        rng = np.random.default_rng(seed)
        out = list(prompt)
        for _ in range(length):
            context = out[-seq:]
            window = np.zeros(seq, np.int32)
            window[: len(context)] = context
            z = host_value(logits_at(self.params, window, len(context) - 1)).astype(np.float64)
            p = np.exp((z - z.max()) / temperature)
            out.append(int(rng.choice(256, p=p / p.sum())))
        return bytes(out).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------


def print_table(results: list[dict]) -> None:
    header = (
        f"{'optimizer':<26}{'val loss':>9}{'bits/byte':>10}{'train loss':>11}"
        f"{'tokens/s':>10}{'compile s':>10}{'state B/param':>14}{'per device':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['optimizer']:<26}{r['val_loss']:>9.4f}{r['val_bits_per_byte']:>10.4f}"
            f"{r['train_loss_last50']:>11.4f}{r['tokens_per_second']:>10,.0f}"
            f"{r['compile_seconds']:>10.1f}{r['state_bytes_per_param']:>14.2f}"
            f"{r['state_bytes_per_param_per_device']:>11.2f}"
        )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        h = r["history"]
        loss = np.asarray(h["train_loss"])
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        (line,) = ax.plot(h["step"][k - 1 :], smooth, lw=1.2, label=f"{r['optimizer']} (train)")
        val = np.asarray(h["val"])
        ax.plot(val[:, 0], val[:, 1], "o--", color=line.get_color(), ms=3, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("byte-level LM on the standard library (dashed: validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    cfg = Config()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=cfg.seq_len)
    ap.add_argument("--d-model", type=int, default=cfg.d_model)
    ap.add_argument("--heads", type=int, default=cfg.heads)
    ap.add_argument("--layers", type=int, default=cfg.layers)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate / η")
    ap.add_argument("--b2", type=float, default=0.99, help="second-moment / evidence decay")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="adamw, on matrices")
    ap.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    ap.add_argument("--final-fraction", type=float, default=0.1, help="schedule's end value")
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of files held out")
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10, help="steps between loss read-backs")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--no-checkpoints", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    ap.add_argument("--sample-length", type=int, default=200, help="bytes of generated text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="variational optimizers: a tempered posterior, the data's weight divided by this "
        "(num_data/T; T > 1 widens the draws)",
    )
    ap.add_argument(
        "--state-dtype",
        choices=["float32", "8bit"],
        default="float32",
        help="optimizer state storage; 8bit: block-wise 8-bit codes (bayesopt_jax.Blockwise8)",
    )
    ap.add_argument(
        "--devices", type=int, default=None, help="devices in all (default: every device)"
    )
    ap.add_argument("--processes", type=int, default=1, help="local JAX processes (loopback)")
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host cluster: jax.distributed.initialize() reads it from the environment",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("outputs/train_lm"))
    ap.add_argument(
        "--crash-at", type=int, default=None, help="SIGKILL the run after this step (tests)"
    )
    # internal: set by the launcher for each worker process
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "d_model",
        "heads",
        "layers",
        "eval_every",
        "log_every",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.checkpoint_every < 1:
        ap.error("--checkpoint-every must be >= 1")
    if args.d_model % args.heads:
        ap.error("--d-model must be a multiple of --heads")
    if args.devices is not None and args.devices % args.processes:
        ap.error("--devices must be a multiple of --processes")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], args) -> dict:
    """Run ``--processes`` copies of this script as one JAX cluster on this machine."""
    port = _free_port()
    per = (args.devices or args.processes) // args.processes
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={per}"
    base = [sys.executable, __file__, *argv, "--port", str(port)]
    procs = [
        subprocess.Popen([*base, "--process-id", str(i)], env=env) for i in range(args.processes)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"worker exit codes {codes}")
    return json.loads((args.out / "results.json").read_text())


def set_up_devices(args):
    """Join the cluster (workers) and give this process its CPU devices; return the mesh."""
    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    elif args.distributed:
        jax.distributed.initialize()
    elif args.devices and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        jax.config.update("jax_num_cpu_devices", args.devices)
    devices = jax.devices()
    n = args.devices or len(devices)
    if n > len(devices):
        raise SystemExit(f"--devices {n}: only {len(devices)} available")
    if args.batch_size % n or args.batch_size < n:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {n} devices")
    return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.processes > 1 and args.process_id is None:
        return launch(argv, args)
    mesh = set_up_devices(args)
    lead = jax.process_index() == 0
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = Config(seq_len=args.seq_len, d_model=args.d_model, heads=args.heads, layers=args.layers)
    data = load_corpus(args.val_fraction)
    graphdef, params0 = build_model(cfg, args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    if lead:
        print(
            f"corpus: {len(data[0]) / 1e6:.1f} MB train, {len(data[1]) / 1e6:.1f} MB validation"
            f" | model: {n_params / 1e6:.2f}M parameters in {len(jax.tree.leaves(params0))} arrays"
            f" | {mesh.size} device(s) in {jax.process_count()} process(es)"
            f" | {args.batch_size * args.seq_len} tokens per step"
        )

    from tqdm.auto import tqdm

    progress = tqdm(total=args.steps, disable=args.no_progress or not lead, leave=False)
    results = []
    for name in args.optimizers:
        trainer = Trainer(name, args, data, mesh, graphdef, params0)
        if not args.no_checkpoints:
            directory = args.out / "checkpoints" / name
            if not args.resume and lead and directory.exists():
                shutil.rmtree(directory)  # a fresh run starts over
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"checkpoints {name}")
            trainer.open_checkpoints(directory)
            if args.resume and trainer.restore_latest() and lead:
                print(f"{name}: resumed at step {trainer.step}")
        trainer.run(progress)
        summary = trainer.summary()
        summary["sample"] = trainer.generate(b"def ", args.sample_length, 0.8, args.seed)
        results.append(summary)
    progress.close()

    record = {
        "config": asdict(cfg),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "devices": mesh.size,
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "results": results,
    }
    if lead:
        print_table(results)
        for r in results:
            print(f"\n--- {r['optimizer']} writes:\n{r['sample']}")
        (args.out / "results.json").write_text(json.dumps(record, indent=1))
        plot(results, args.out / "loss_curves.png")
    if args.process_id is not None or args.distributed:
        jax.distributed.shutdown()
    return record


if __name__ == "__main__":
    main()
