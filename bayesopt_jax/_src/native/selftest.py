"""The native kernels' self-test: every rule and branch against its float64 transcription."""

from __future__ import annotations

import jax
import numpy as np

from bayesopt_jax._src import quantize
from bayesopt_jax._src.native import calls, transcriptions
from bayesopt_jax._src.native.loading import RULES


def self_test() -> str | None:
    """Checks every kernel against its transcription; returns what differs, or ``None``.

    Runs once, when the native path is first needed, on this process's
    first CPU device and on arrays it creates itself, so that in a
    multi-process run (``jax.distributed``) every process runs the same
    check on its own device and reaches the same decision. For every rule
    and every branch of it (see :func:`.transcriptions.cases`), a few leaves (one large
    enough to be split across threads) with ordinary, tiny, huge and
    non-finite gradients go through the update kernel (the state) and the
    step kernel (state and parameters, weight decay on two of the three
    leaves); every result must be within
    64 float32 rounding units of its terms' magnitude of the float64 value,
    with the same non-finite entries. The same leaves with their state in
    8-bit storage go through the 8-bit kernel: its updates are checked the
    same way, and its codes and scales must equal the encoding (a NumPy
    transcription of the encoder) of the float32 kernel's new state.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    rng = np.random.default_rng(0)
    values, mids, _, _ = quantize.kernel_tables()
    factor, wd = -1e-3, 0.1
    decay = [True, False, True]
    for rule, sc in transcriptions.cases():
        ps, gs, states = transcriptions.inputs(rule, rng)
        k = len(ps)

        def program(sc, fw, ps, gs, states, stored, decoded, rule=rule):
            new = calls.update(rule, sc, gs, states)
            new_ps, stepped = calls.step(rule, sc, fw, ps, gs, states, decay)
            us, stored_new = calls.update_stored(rule, sc, gs, stored)
            return new, new_ps, stepped, us, stored_new, calls.update(rule, sc, gs, decoded)

        # The same leaves with the state in 8-bit storage (blocks of 16),
        # encoded in NumPy, so that the program holds only kernel calls.
        signed = RULES[rule].signed
        encoded = [
            [
                transcriptions.stored(x, values[int(j in signed)], mids[int(j in signed)], 16)
                for x in col
            ]
            for j, col in enumerate(states)
        ]
        stored = [
            [
                quantize.Quantized(
                    (idx - (128 if j in signed else 0)).astype(
                        np.int8 if j in signed else np.uint8
                    ),
                    sc_,
                )
                for idx, sc_, _ in col
            ]
            for j, col in enumerate(encoded)
        ]
        decoded = [[dec for _, _, dec in col] for col in encoded]
        fw = np.asarray([factor, wd], np.float32)
        operands = (sc, fw, ps, gs, states, stored, decoded)
        # Lowered and compiled explicitly, so that this also works when the
        # first use happens while another function is being traced.
        jitted = jax.jit(program, in_shardings=cpu, out_shardings=cpu)
        new, new_ps, stepped, us, stored_new, plain = jitted.lower(*operands).compile()(*operands)
        got = [
            [
                (np.asarray(q.codes).astype(np.int64) + (128 if j in signed else 0), q.scale)
                for q in col
            ]
            for j, col in enumerate(stored_new)
        ]
        want = [
            [
                transcriptions.stored(
                    np.asarray(x), values[int(j in signed)], mids[int(j in signed)], 16
                )[:2]
                for x in col
            ]
            for j, col in enumerate(plain)
        ]
        for i in range(k):
            why = transcriptions.check_leaf(
                i, rule, sc, fw, ps, gs, states, new, new_ps, stepped, decay
            )
            if why is None:
                why = transcriptions.check_stored_leaf(i, rule, sc, gs, decoded, us, got, want)
            if why is not None:
                return why
    return _check_sample(cpu)


def _check_sample(cpu) -> str | None:
    """The draw kernel against float64 √2·erf⁻¹ of the pure path's uniforms.

    With p = 0, N = 1, δ = 1 and no curvature, v = 1 and the kernel returns ε
    itself; 70 001 entries (cut into chunks) of two leaves must be within the
    float32 bound of :func:`.transcriptions.erfinv_bound`.
    """
    shapes = [(70_001,), (3, 5)]
    words = np.array([[0x12345678, 0x9ABCDEF0, 0x0F1E2D3C], [7, 11, 13]], np.uint32)
    zeros = [np.zeros(s, np.float32) for s in shapes]
    operands = (np.array([1.0, 0.0], np.float32), np.ones(2, np.float32), words, zeros, zeros)
    jitted = jax.jit(lambda *a: calls.sample(*a), in_shardings=cpu, out_shardings=cpu)
    out = jitted.lower(*operands).compile()(*operands)
    for i, shape in enumerate(shapes):
        why = transcriptions.check_normal(words[i], shape, np.asarray(out[i]))
        if why is not None:
            return why
    return None
