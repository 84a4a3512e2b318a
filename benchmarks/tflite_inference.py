"""TFLite (LiteRT) inference: a FAVOR language model vs the same model with exact softmax attention.

Two float32 `.tflite` models, identical but for the attention: a causal decoder-only LM,
``token_ids`` (1, L) -> `TokenAndPositionEmbedding` (vocabulary 1024, width 256, sinusoidal
positions) -> 2 `FavorTransformerDecoder` blocks (4 heads of 64, feed-forward 1024) -> LayerNorm
-> Dense logits (1, L, 1024). FAVOR: M=128 random features, causal chunk 128. Softmax: the same
blocks with ``attention_type="softmax"`` (keras.layers.MultiHeadAttention with a causal mask, the
same sub-layers; its causal mask is passed explicitly during export, see `explicit_causal_mask`,
because Keras's native causal path needs a Flex op). Both are exported with
`keras_favor.export.export_tflite` (builtin ops only), checked against Keras, and run with
LiteRT's `Interpreter` (XNNPACK), batch 1.

1. Forward pass (``serving_default``) at L = 1024, 4096, 16384: median wall time of `invoke`
   and peak RSS. Goal at 16384: FAVOR ≤ 1/5 of softmax in both. If softmax fails part way
   (e.g. its (1, 4, L, L) score tensors cannot be allocated under the cap), the time it ran and
   the RSS it reached are lower bounds of its cost, and the ratios are reported as upper bounds
   (``<=``).
2. Decode step (FAVOR ``decode_step``, one token) at context 1024 vs 65536: the states are made
   honestly, by decoding 65536 tokens one step at a time from ``initial_state`` and keeping the
   state after 1024 and after 65536 tokens; then steps from each state are timed, interleaved
   (so that load on a shared machine hits both alike). Goal: latency ratio 65536 / 1024 ≤ 1.2.

Every measurement runs in its own child process that imports only numpy and LiteRT, with its
address space capped (``--memory-limit-gb``, default 20, lowered to what the machine has free),
so running out of memory ends that trial, not the machine. Peak RSS is the child's high-water
mark (``VmHWM``; for a child that died, ``ru_maxrss`` from `wait4`): the whole process, Python
and LiteRT included (``base_rss_gib`` in the JSON is the RSS before the interpreter was made).
The conversion runs in a child too, so the parent never holds TensorFlow. The forward passes use
``--threads`` (2) interpreter threads, the one-token decode step ``--decode-threads`` (1).

    python benchmarks/tflite_inference.py            # the full run (several minutes)
    python benchmarks/tflite_inference.py --quick    # L = 256, 1024; contexts 128 vs 1024

Results: benchmarks/results/tflite_inference.json (``--quick`` writes
tflite_inference_quick.json). Timings of a shared machine are noisy: compare ratios, and read the
CPU times alongside.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_trial_arguments,
    capped_memory_limit_gb,
    child_trial_main,
    fmt,
    ratio,
    run_in_capped_child,
    run_info,
    status_gib,
    write_json,
)

VOCAB = 1024
WIDTH = 256
NUM_HEADS = 4
INTERMEDIATE = 1024
NUM_BLOCKS = 2
NUM_RANDOM_FEATURES = 128
CHUNK = 128
ATTENTION_TYPES = ("favor", "softmax")

# ----------------------------------------------------------------------------------------------
# Building and converting the two models (parent process, TensorFlow).


def build_model(attention_type, seed=0):
    """The benchmark LM with `attention_type` ``"favor"`` or ``"softmax"``."""
    import keras

    from keras_favor.layers import FavorTransformerDecoder, TokenAndPositionEmbedding

    keras.utils.set_random_seed(seed)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(VOCAB, None, WIDTH, position_embedding_type="sine")(token_ids)
    for i in range(NUM_BLOCKS):
        x = FavorTransformerDecoder(
            INTERMEDIATE,
            NUM_HEADS,
            num_random_features=NUM_RANDOM_FEATURES,
            causal_chunk_size=CHUNK,
            causal_conv_kernel_size=None,  # the plain block: the same layers as softmax's
            attention_type=attention_type,
            seed=seed + i,
            name=f"decoder_{i}",
        )(x)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    model = keras.Model(token_ids, keras.layers.Dense(VOCAB, name="logits")(x))
    model(keras.ops.ones((1, 8), "int32"))
    return model


@contextlib.contextmanager
def explicit_causal_mask():
    """Within this context, causal `keras.layers.MultiHeadAttention` passes an explicit mask.

    Keras's native causal path (``dot_product_attention(is_causal=True)``, TensorFlow backend)
    slices a bool mask as ``mask[None, None, :, :]``, a StridedSlice that TFLite has no builtin
    for, so the softmax model would need Flex. Here a causal call builds the same lower-triangular
    (1, T, S) mask from builtin ops (RANGE, GREATER_EQUAL, EXPAND_DIMS) and takes the path Keras
    takes for any ``attention_mask``: the same exact softmax attention, builtins only.
    """
    import keras
    from keras import ops

    mha = keras.layers.MultiHeadAttention
    original = mha._compute_attention

    def compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if use_causal_mask and attention_mask is None:
            rows = ops.expand_dims(ops.arange(ops.shape(query)[1]), 1)  # (T, 1)
            cols = ops.expand_dims(ops.arange(ops.shape(key)[1]), 0)  # (1, S)
            attention_mask = ops.expand_dims(ops.greater_equal(rows, cols), 0)  # (1, T, S)
        return original(self, query, key, value, attention_mask, training, return_attention_scores)

    mha._compute_attention = compute_attention
    try:
        yield
    finally:
        mha._compute_attention = original


def convert_models(directory, check_length=200):
    """Writes favor.tflite and softmax.tflite into `directory`.

    Each `.tflite` is checked against its Keras model (the softmax one as Keras runs it, on its
    native causal path) on `check_length` tokens.

    Returns:
        dict attention type -> {"path", "bytes", "max_abs_error_vs_keras"}.
    """
    import keras
    import numpy as np

    from keras_favor import export

    ids = np.random.default_rng(1).integers(1, VOCAB, (1, check_length)).astype(np.int32)
    result = {}
    for attention_type in ATTENTION_TYPES:
        path = os.path.join(directory, f"{attention_type}.tflite")
        model = build_model(attention_type)
        if attention_type == "favor":
            export.export_tflite(model, path, decode=True)
        else:  # no fixed-size state, so no decode signatures
            with explicit_causal_mask():
                export.export_tflite(model, path, decode=None)
        got = export.TFLiteRunner(path).run({"token_ids": ids})["logits"]
        error = float(np.abs(got - keras.ops.convert_to_numpy(model(ids))).max())
        result[attention_type] = {
            "path": path,
            "bytes": os.path.getsize(path),
            "max_abs_error_vs_keras": error,
        }
        keras.backend.clear_session()
    return result


def convert_trial(directory):
    """The conversion, in a child process so that the parent never holds TensorFlow."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    return {"ok": True, "models": convert_models(directory)}


# ----------------------------------------------------------------------------------------------
# Trials (child processes: numpy and LiteRT only).


def _interpreter(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=path, num_threads=threads)


def forward_trial(path, length, threads, repeats, time_budget_s, seed=0):
    """Times ``serving_default`` on (1, length) token ids."""
    import numpy as np

    base_rss = status_gib("VmRSS")
    interpreter = _interpreter(path, threads)
    loaded_rss = status_gib("VmRSS")
    runner = interpreter.get_signature_runner("serving_default")
    ids = np.random.default_rng(seed).integers(1, VOCAB, (1, length)).astype(np.int32)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        logits = runner(token_ids=ids)["logits"]
    except Exception as error:  # noqa: BLE001 - e.g. the arena cannot be allocated under the cap
        # A full run takes at least the time, and reaches at least the RSS, of its failed prefix:
        # lower bounds on this model's cost at this length.
        return {
            "ok": False,
            "failure": "error",
            "message": repr(error)[-500:],
            "failed_after_s": time.perf_counter() - start,
            "hwm_rss_gib": status_gib("VmHWM"),
            "vm_peak_gib": status_gib("VmPeak"),
            "base_rss_gib": base_rss,
            "loaded_rss_gib": loaded_rss,
        }
    first_s = time.perf_counter() - start
    first_cpu_s = time.process_time() - cpu_start
    if logits.shape != (1, length, VOCAB) or not np.isfinite(logits).all():
        raise RuntimeError(f"bad logits: shape {logits.shape}, finite {np.isfinite(logits).all()}")
    # Long trials repeat less, within the time budget (at least once).
    repeats = max(1, min(repeats, int(time_budget_s // max(first_s, 1e-3))))
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        runner(token_ids=ids)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "ok": True,
        "first_s": first_s,
        "first_cpu_s": first_cpu_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_median_s": statistics.median(cpu_times),
        "times_s": times,
        "base_rss_gib": base_rss,
        "loaded_rss_gib": loaded_rss,
        "hwm_rss_gib": status_gib("VmHWM"),
    }


def decode_trial(path, contexts, threads, repeats, steps_per_repeat, seed=0):
    """Decodes max(contexts) tokens step by step, then times steps from each kept state."""
    import numpy as np

    interpreter = _interpreter(path, threads)
    init = interpreter.get_signature_runner("initial_state")
    step = interpreter.get_signature_runner("decode_step")
    state = init(batch_size=np.array(1, np.int32))
    names = sorted(state)
    tokens = np.random.default_rng(seed).integers(1, VOCAB, (max(contexts) + 1,)).astype(np.int32)
    kept, prefill_times = {}, []
    wanted = set(contexts)
    start_all = time.perf_counter()
    for t in range(max(contexts)):
        start = time.perf_counter()
        out = step(token_ids=tokens[t : t + 1], position=np.array([t], np.int32), **state)
        prefill_times.append(time.perf_counter() - start)
        state = {name: out[name] for name in names}
        if t + 1 in wanted:
            kept[t + 1] = {name: value.copy() for name, value in state.items()}
    prefill_s = time.perf_counter() - start_all

    def run(context):
        return step(
            token_ids=tokens[context : context + 1],
            position=np.array([context], np.int32),
            **kept[context],
        )

    for context in contexts:  # warm up each state once
        run(context)
    samples = {context: [] for context in contexts}
    cpu_samples = {context: [] for context in contexts}
    for _ in range(repeats):  # interleaved: each repeat times every context in turn
        for context in contexts:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps_per_repeat):
                run(context)
            samples[context].append((time.perf_counter() - start) / steps_per_repeat)
            cpu_samples[context].append((time.process_time() - cpu_start) / steps_per_repeat)

    def window(end, size=256):
        values = prefill_times[max(0, end - size) : end]
        return statistics.median(values) if values else None

    state_bytes = sum(value.nbytes for value in kept[contexts[0]].values())
    # The normalizer sums z = Σ φ(k) grow with the context: evidence that the state holds it.
    z_sums = {
        str(c): float(sum(np.abs(kept[c][n]).sum() for n in names if kept[c][n].ndim == 3))
        for c in contexts
    }
    return {
        "ok": True,
        "prefill_s": prefill_s,
        "prefill_steps": max(contexts),
        "state_bytes": int(state_bytes),
        "z_abs_sums": z_sums,
        "step_median_s": {str(c): statistics.median(samples[c]) for c in contexts},
        "step_min_s": {str(c): min(samples[c]) for c in contexts},
        "step_cpu_median_s": {str(c): statistics.median(cpu_samples[c]) for c in contexts},
        "prefill_window_median_s": {str(c): window(c) for c in contexts},
        "hwm_rss_gib": status_gib("VmHWM"),
    }


def _run_trial(kind, **spec):
    trials = {"forward": forward_trial, "decode": decode_trial, "convert": convert_trial}
    return trials[kind](**spec)


def trial(kind, *, memory_limit_gb, timeout_s, **spec):
    """Runs one trial in a capped child process (with its peak RSS and exit status)."""
    return run_in_capped_child(
        __file__, {**spec, "kind": kind}, memory_limit_gb=memory_limit_gb, timeout_s=timeout_s
    )


# ----------------------------------------------------------------------------------------------
# The run (parent).


def forward(args, paths, memory_limit_gb):
    rows = []
    for length in args.lengths:
        row = {"length": length}
        for attention_type in ATTENTION_TYPES:
            print(f"  forward L={length} {attention_type} ...", end=" ", flush=True)
            result = trial(
                "forward",
                path=paths[attention_type],
                length=length,
                threads=args.threads,
                repeats=args.repeats,
                time_budget_s=args.time_budget,
                memory_limit_gb=memory_limit_gb,
                timeout_s=args.trial_timeout,
            )
            status = f"{1000 * result['median_s']:.0f} ms" if result["ok"] else result["failure"]
            print(f"{status}, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
            row[attention_type] = result
        favor, softmax = row["favor"], row["softmax"]
        both = favor["ok"] and softmax["ok"]
        row["time_ratio"] = ratio(favor["median_s"], softmax["median_s"]) if both else None
        row["cpu_time_ratio"] = (
            ratio(favor["cpu_median_s"], softmax["cpu_median_s"]) if both else None
        )
        # If softmax failed part way, its RSS then (and time until then) only bound its cost
        # from below, so the ratios become upper bounds ("bounds": True).
        row["bounds"] = favor["ok"] and not softmax["ok"]
        row["peak_rss_ratio"] = ratio(favor["peak_rss_gib"], softmax["peak_rss_gib"])
        if row["bounds"] and softmax.get("failed_after_s"):
            row["time_ratio"] = ratio(favor["median_s"], softmax["failed_after_s"])
        rows.append(row)
    return rows


def decode(args, paths, memory_limit_gb):
    contexts = args.contexts
    print(f"  decode: {max(contexts)} steps, then steps at contexts {contexts} ...", flush=True)
    result = trial(
        "decode",
        path=paths["favor"],
        contexts=contexts,
        threads=args.decode_threads,
        repeats=args.decode_repeats,
        steps_per_repeat=args.steps_per_repeat,
        memory_limit_gb=memory_limit_gb,
        timeout_s=args.trial_timeout,
    )
    if result["ok"]:
        low, high = str(min(contexts)), str(max(contexts))
        result["latency_ratio"] = result["step_median_s"][high] / result["step_median_s"][low]
        result["cpu_latency_ratio"] = (
            result["step_cpu_median_s"][high] / result["step_cpu_median_s"][low]
        )
        windows = result["prefill_window_median_s"]
        result["prefill_window_ratio"] = ratio(windows[high], windows[low])
    return result


def report(rows, decoded, args):
    print(
        f"\nForward pass, batch 1, {args.threads} threads (median wall ms; CPU ms in brackets; "
        "peak RSS of the process)"
    )
    header = (
        f"{'L':>6} | {'FAVOR ms':>15} {'softmax ms':>17} | {'time F/S':>8} {'cpu F/S':>7} | "
        f"{'FAVOR GiB':>9} {'softmax GiB':>11} {'RSS F/S':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for attention_type in ATTENTION_TYPES:
            r = row[attention_type]
            if r["ok"]:
                cells.append(f"{1000 * r['median_s']:.0f} ({1000 * r['cpu_median_s']:.0f})")
            elif r.get("failed_after_s") is not None:
                cells.append(f"FAIL >{1000 * r['failed_after_s']:.0f}")
            else:
                cells.append(r["failure"].upper())
        bound = "<=" if row["bounds"] else ""
        print(
            f"{row['length']:>6} | {cells[0]:>15} {cells[1]:>17} | "
            f"{bound}{fmt(row['time_ratio'], '.3f'):>{8 - len(bound)}} "
            f"{fmt(row['cpu_time_ratio'], '.3f'):>7} | "
            f"{row['favor']['peak_rss_gib']:>9.2f} {row['softmax']['peak_rss_gib']:>11.2f} "
            f"{bound}{fmt(row['peak_rss_ratio'], '.3f'):>{7 - len(bound)}}"
        )
    for row in rows:
        if row["bounds"]:
            r = row["softmax"]
            print(
                f"  L={row['length']}: softmax failed ({r.get('message', r['failure'])[:100]}) "
                f"after {r.get('failed_after_s') or 0:.1f} s at {r['peak_rss_gib']:.2f} GiB RSS "
                "(address space capped): '<=' ratios use those as lower bounds of its cost"
            )
    if decoded is not None:
        print(
            f"\nDecode step (FAVOR decode_step, batch 1, {args.decode_threads} thread(s)), "
            "states made by decoding step by step"
        )
        if not decoded["ok"]:
            print(f"  failed: {decoded['failure']}: {decoded.get('message', '')[:300]}")
        else:
            for context in args.contexts:
                c = str(context)
                print(
                    f"  context {context:>6}: {1e3 * decoded['step_median_s'][c]:.3f} ms "
                    f"(CPU {1e3 * decoded['step_cpu_median_s'][c]:.3f} ms; "
                    f"during the prefill {1e3 * decoded['prefill_window_median_s'][c]:.3f} ms), "
                    f"|z| sum {decoded['z_abs_sums'][c]:.3g}"
                )
            print(
                f"  ratio {max(args.contexts)}/{min(args.contexts)}: "
                f"{decoded['latency_ratio']:.3f} (CPU {decoded['cpu_latency_ratio']:.3f}); "
                f"state {decoded['state_bytes'] / 1024:.0f} KiB at every context; "
                f"prefill of {decoded['prefill_steps']} steps took {decoded['prefill_s']:.1f} s"
            )


def goals(rows, decoded):
    """The issue's goals: ≤ 1/5 of softmax time and RSS at the longest L; decode ratio ≤ 1.2."""
    last = rows[-1]
    result = {"length": last["length"]}
    result["time_goal_met"] = last["time_ratio"] is not None and last["time_ratio"] <= 0.2
    if last["softmax"]["ok"]:
        result["rss_goal_met"] = last["peak_rss_ratio"] <= 0.2
    else:
        # Softmax failed (e.g. could not allocate under the memory cap). A full run would take at
        # least the time, and reach at least the RSS, of the part that ran: upper bounds on the
        # ratios. A bound that is not ≤ 0.2 leaves the goal undecided (None).
        softmax, favor = last["softmax"], last["favor"]
        result["note"] = (
            f"softmax failed at L={last['length']} ({softmax['failure']}: "
            f"{softmax.get('message', '')[:120]}) after {softmax.get('failed_after_s', 0):.1f} s "
            f"at {softmax['peak_rss_gib']:.2f} GiB RSS; ratios are upper bounds"
        )
        result["time_goal_met"] = result["rss_goal_met"] = None
        if favor["ok"]:
            rss_bound = favor["peak_rss_gib"] / softmax["peak_rss_gib"]
            result["rss_ratio_upper_bound"] = rss_bound
            result["rss_goal_met"] = True if rss_bound <= 0.2 else None
            if softmax.get("failed_after_s"):
                time_bound = favor["median_s"] / softmax["failed_after_s"]
                result["time_ratio_upper_bound"] = time_bound
                result["time_goal_met"] = True if time_bound <= 0.2 else None
    if decoded is not None:
        result["decode_goal_met"] = bool(decoded["ok"]) and decoded["latency_ratio"] <= 1.2
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, a smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--contexts", type=int, nargs=2, default=None)
    parser.add_argument("--threads", type=int, default=2, help="LiteRT interpreter threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes")
    parser.add_argument("--time-budget", type=float, default=90.0, help="seconds per trial")
    parser.add_argument(
        "--decode-threads", type=int, default=1, help="threads for the one-token decode step"
    )
    parser.add_argument("--decode-repeats", type=int, default=40)
    parser.add_argument("--steps-per-repeat", type=int, default=100)
    add_trial_arguments(parser)
    args = parser.parse_args(argv)
    if args._trial:
        child_trial_main(args._trial, _run_trial)
        return
    if args.lengths is None:
        args.lengths = [256, 1024] if args.quick else [1024, 4096, 16384]
    if args.contexts is None:
        args.contexts = [128, 1024] if args.quick else [1024, 65536]
    if args.quick:
        args.repeats, args.decode_repeats, args.steps_per_repeat = 2, 5, 20
    args.contexts = sorted(args.contexts)

    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    memory_limit_gb = capped_memory_limit_gb(args.memory_limit_gb)
    print(f"memory cap per trial: {memory_limit_gb:.1f} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        print("converting the two models ...", flush=True)
        converted = trial("convert", directory=tmp, memory_limit_gb=0, timeout_s=args.trial_timeout)
        if not converted["ok"]:
            raise SystemExit(f"conversion failed: {converted['message']}")
        models = converted["models"]
        for name, model in models.items():
            print(
                f"  {name}.tflite: {model['bytes'] / 2**20:.1f} MiB, max |TFLite - Keras| "
                f"{model['max_abs_error_vs_keras']:.1e}",
                flush=True,
            )
        paths = {name: model["path"] for name, model in models.items()}
        rows = forward(args, paths, memory_limit_gb)
        decoded = decode(args, paths, memory_limit_gb)
    report(rows, decoded, args)
    met = goals(rows, decoded)
    print(f"\ngoals (at L={met['length']}; decode {args.contexts[1]} vs {args.contexts[0]}): {met}")

    settings = dict(
        model=(
            f"causal LM: vocab {VOCAB}, width {WIDTH}, {NUM_BLOCKS} FavorTransformerDecoder "
            f"blocks, {NUM_HEADS} heads, feed-forward {INTERMEDIATE}, sine positions"
        ),
        favor=f"softmax_positive, M={NUM_RANDOM_FEATURES}, causal chunk {CHUNK}",
        softmax="attention_type='softmax' (keras.layers.MultiHeadAttention, causal mask)",
        tflite="float32, builtin ops only, LiteRT Interpreter (XNNPACK), batch 1",
        model_bytes={name: model["bytes"] for name, model in models.items()},
        max_abs_error_vs_keras={
            name: model["max_abs_error_vs_keras"] for name, model in models.items()
        },
        lengths=args.lengths,
        contexts=args.contexts,
        threads=args.threads,
        decode_threads=args.decode_threads,
        repeats=args.repeats,
        decode_repeats=args.decode_repeats,
        steps_per_repeat=args.steps_per_repeat,
        memory_limit_gib=memory_limit_gb,
        quick=args.quick,
    )
    data = {**run_info(**settings), "forward": rows, "decode": decoded, "goals": met}
    path = write_json("tflite_inference_quick" if args.quick else "tflite_inference", data)
    print(f"\nwrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
