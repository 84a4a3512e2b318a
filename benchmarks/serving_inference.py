"""Serving inference: the quickstart model under TF Serving's loader and TFLite, FAVOR vs exact.

What TF Serving and TFLite users pay for: tokens per second of the forward pass and latency per
token of streaming decoding, CPU, batch 1, for three models with the quickstart's architecture
and its default settings (`examples/quickstart.py`: `build_model` with what `main()` passes by
default: byte vocabulary, width 128, 4 heads, 2 pre-LN blocks, feed-forward 512, M=64
`softmax_positive` features, causal chunk 128, per-head state decay, causal convolution of
kernel 4, no position embeddings), random weights (seed 0; the cost does not depend on them):

- ``favor``: the quickstart model;
- ``exact``: the same model with exact softmax attention (``attention_type="softmax"``:
  `keras.layers.MultiHeadAttention` with a causal mask, the same sub-layers and weights; it takes
  no state decay, so it has none);
- ``floor``: the favor model with each attention's core (feature maps, prefix sums) replaced by a
  pass-through of its value projection: the value and output projections, causal convolutions,
  norms, feed-forward and head all run, no attention mixes positions. No attention layer can be
  cheaper. Its streaming state keeps the favor model's shapes and passes through unchanged.

Each is exported with `keras_favor.export.export_saved_model` (TF Serving layout, signatures
``serving_default``, and ``initial_state`` / ``decode_step`` for favor and floor) and
`keras_favor.export.export_tflite` (float32, builtin ops only; the exact model's causal mask is
made of builtin ops during its conversion, see `tflite_inference.explicit_causal_mask`), and each
export is checked against Keras. Then, every measurement in its own memory-capped child process:

1. SavedModel through the TF C API (`keras_favor.export.testing.SavedModelSession`: the C++
   SavedModel loader TF Serving is built on, `TF_SessionRun`; TensorFlow's default thread pools):
   tokens/s of ``serving_default`` at L = 2048, 8192, 32768.
2. TFLite (LiteRT `Interpreter`, XNNPACK, ``--threads`` threads, input resized to L): tokens/s of
   ``serving_default`` at the same lengths.
3. Decode step: latency per token of ``decode_step`` (SavedModel through the C API, and TFLite with
   ``--decode-threads`` threads) of favor and floor, from the state after a context of 2048
   tokens (made honestly, one step at a time from ``initial_state``).

favor and floor are timed in the same child, interleaved (`time_interleaved`: each round calls
each once, so drifting load hits both alike); exact in a child of its own, because its (1, 4, L, L)
attention scores can run out of memory under the cap (``--memory-limit-gb``, default 20, lowered
to what the machine has free): that is recorded as its result (``"failure": "oom"``) and longer
lengths are then skipped for it. Tokens/s are L over the fastest call (``min_s``, the least
disturbed); medians are in the JSON too. Ratios: favor/exact and favor/floor tokens/s at each
length and runtime, and favor/floor decode latency, all measured in the same run.

    python benchmarks/serving_inference.py            # the full run (ten minutes or more)
    python benchmarks/serving_inference.py --quick    # L = 256, 512; context 256

Results: benchmarks/results/serving_inference.json (``--quick`` writes
serving_inference_quick.json). Run on a quiet machine: timings of a shared machine say little.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_trial_arguments,
    capped_memory_limit_gb,
    child_trial_main,
    fmt,
    looks_like_oom,
    ratio,
    run_in_capped_child,
    run_info,
    status_gib,
    time_interleaved,
    write_json,
)

MODELS = ("favor", "exact", "floor")
RUNTIMES = ("saved_model", "tflite")
# favor and floor are timed together (interleaved); exact alone (it may run out of memory).
FORWARD_GROUPS = (("favor", "floor"), ("exact",))
DECODE_MODELS = ("favor", "floor")
INPUT = "token_ids"
OUTPUT = "logits"
VOCAB = 256  # bytes
TOLERANCE = 1e-3  # the largest |logit difference| accepted between Keras and an export

# ----------------------------------------------------------------------------------------------
# The three models (conversion child: Keras and TensorFlow).


def quickstart_arguments():
    """The `quickstart.build_model` arguments that `quickstart.main()` passes by default."""
    import inspect

    import keras_favor
    from examples import quickstart

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(quickstart.main).parameters.items()
    }
    rates = None
    if defaults["decay"]:  # as main() computes them
        window = defaults["long_sequence_length" if defaults["long_steps"] else "sequence_length"]
        rates = keras_favor.ops.decay_rates(
            defaults["num_heads"], defaults["shortest_reach"], defaults["longest_reach"] or window
        )
    return dict(
        width=defaults["width"],
        num_heads=defaults["num_heads"],
        num_blocks=defaults["num_blocks"],
        intermediate_dim=defaults["intermediate_dim"],
        num_random_features=defaults["num_random_features"],
        decay=rates,
        causal_conv_kernel_size=defaults["causal_conv_kernel_size"] or None,
        use_rotary_embedding=defaults["rotary"],
        seed=defaults["seed"],
    )


def model_arguments(name):
    """`quickstart.build_model` arguments of model `name` (exact: softmax, no decay)."""
    arguments = quickstart_arguments()
    if name == "exact":
        arguments.update(attention_type="softmax", decay=None)
    return arguments


def build_model(name):
    """Model `name` of `MODELS`, random weights (the floor is the favor model: see
    `attention_floor`)."""
    import keras

    from examples import quickstart

    arguments = model_arguments(name)
    keras.utils.set_random_seed(arguments["seed"])
    return quickstart.build_model(**arguments)


@contextlib.contextmanager
def attention_floor():
    """Within this context, every `FavorAttention` outputs its value projection.

    The attention core (feature maps, prefix sums, normalizer) is replaced by a pass-through of the
    projected values, (B, T, N, D) -> (B, T, N, D), before the output projection; a decoding step
    returns the step's projected value and the state unchanged. Everything around the core runs
    as before: what is left is the cost of the model without attention, a floor for any attention.
    """
    from keras_favor.layers import FavorAttention

    original = FavorAttention._compute_attention, FavorAttention._compute_step

    def compute_attention(self, query, key, value, *args, **kwargs):
        return value, None  # self-attention: T == S

    def compute_step(self, query, key, value, state):
        return value[:, 0], tuple(state)  # (B, N, D), the state as it was

    FavorAttention._compute_attention, FavorAttention._compute_step = (
        compute_attention,
        compute_step,
    )
    try:
        yield
    finally:
        FavorAttention._compute_attention, FavorAttention._compute_step = original


def _maybe_floor(name):
    return attention_floor() if name == "floor" else contextlib.nullcontext()


def _decode_logits(run, ids):
    """Logits of `ids` (1, T) decoded one step at a time; `run(signature, inputs)` -> outputs."""
    import numpy as np

    state = run("initial_state", {"batch_size": np.array(1, np.int32)})
    names = sorted(state)
    logits = []
    for t in range(ids.shape[1]):
        out = run(
            "decode_step",
            {INPUT: ids[:, t], "position": np.array([t], np.int32), **state},
        )
        state = {name: out[name] for name in names}
        logits.append(out[OUTPUT])
    return np.stack(logits, axis=1)  # (1, T, V)


def convert_models(directory, check_length, decode_check_length=8):
    """Exports the three models into `directory` and checks every export against Keras.

    Returns:
        dict model name -> {"saved_model", "tflite" (paths), "tflite_bytes", "signatures",
        "parameters", "max_abs_error" (by runtime, forward and decode)}.

    Raises:
        RuntimeError: if an export differs from Keras by more than `TOLERANCE`.
    """
    import keras
    import numpy as np

    from benchmarks.tflite_inference import explicit_causal_mask
    from examples.data import trainable_parameters
    from keras_favor import export
    from keras_favor.export.testing import SavedModelSession

    ids = np.random.default_rng(1).integers(1, VOCAB, (1, check_length)).astype(np.int32)
    result, references = {}, {}
    for name in MODELS:
        model = build_model(name)
        saved_model = os.path.join(directory, name)
        tflite = os.path.join(directory, f"{name}.tflite")
        with _maybe_floor(name):
            reference = references[name] = keras.ops.convert_to_numpy(model(ids))
            saved_model = export.export_saved_model(model, saved_model, version=1)
        if name == "floor" and np.abs(reference - references["favor"]).max() < 1e-3:
            raise RuntimeError("The floor model computes what the favor model does.")
        if name == "exact":  # no fixed-size state, so no decode signatures
            with explicit_causal_mask():  # builtin ops only (no Flex)
                export.export_tflite(model, tflite, decode=None)
        else:
            export.export_tflite(saved_model, tflite)
        runtimes = {
            "saved_model": SavedModelSession(saved_model),
            "tflite": export.TFLiteRunner(tflite),
        }
        errors, signatures = {}, None
        for runtime, runner in runtimes.items():
            got = runner.run({INPUT: ids})[OUTPUT]
            errors[f"{runtime}_forward"] = float(np.abs(got - reference).max())
            signatures = runner.signature_names
            if "decode_step" in signatures:
                decoded = _decode_logits(
                    lambda signature, inputs, runner=runner: runner.run(inputs, signature),
                    ids[:, :decode_check_length],
                )
                error = np.abs(decoded - reference[:, :decode_check_length]).max()
                errors[f"{runtime}_decode"] = float(error)
        runtimes["saved_model"].close()
        bad = {key: value for key, value in errors.items() if not value <= TOLERANCE}
        if bad:
            raise RuntimeError(f"The {name} exports differ from Keras beyond {TOLERANCE}: {bad}")
        result[name] = {
            "saved_model": saved_model,
            "tflite": tflite,
            "tflite_bytes": os.path.getsize(tflite),
            "signatures": list(signatures),
            "parameters": trainable_parameters(model),
            "max_abs_error": errors,
        }
        keras.backend.clear_session()
    return result


def convert_trial(directory, check_length):
    """The conversion, in a child process so that the parent never holds TensorFlow."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    return {
        "ok": True,
        "models": convert_models(directory, check_length),
        "arguments": {name: model_arguments(name) for name in MODELS},
    }


# ----------------------------------------------------------------------------------------------
# Trials (child processes).


def _signature_runner(runtime, path, threads):
    """`run(signature, inputs) -> outputs` on a loaded model: the TF C API session (TF Serving's
    loader) or a LiteRT interpreter (one signature runner per signature, made once)."""
    if runtime == "saved_model":
        from keras_favor.export.testing import SavedModelSession

        session = SavedModelSession(path)
        return lambda signature, inputs: session.run(inputs, signature)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    runners = {}

    def run(signature, inputs):
        if signature not in runners:
            runners[signature] = interpreter.get_signature_runner(signature)
        return runners[signature](**inputs)

    return run


def _out_of_memory(runtime, message):
    """Whether a failed call ran out of memory. Under the address-space cap, LiteRT reports an
    allocation that fails as a delegate that "failed to prepare" (the same call passes with a
    higher cap)."""
    import resource

    capped = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    prepare = runtime == "tflite" and "failed to prepare" in message
    return looks_like_oom(message) or (capped and prepare)


def _summary(timing, length):
    """A `time_interleaved` entry with tokens/s (from the fastest and the median call)."""
    return {
        "ok": True,
        **timing,
        "tokens_per_s": length / timing["min_s"],
        "tokens_per_s_median": length / timing["median_s"],
    }


def forward_trial(runtime, paths, length, threads, time_budget_s, max_repeats, seed=0):
    """Times ``serving_default`` on (1, length) token ids of each model in `paths`, interleaved.

    A model whose first call fails (e.g. cannot allocate under the memory cap) gets
    {"ok": False, "failure": "oom" | "error", ...} and the others go on.
    """
    import numpy as np

    base_rss = status_gib("VmRSS")
    ids = np.random.default_rng(seed).integers(1, VOCAB, (1, length)).astype(np.int32)
    results, calls, first = {}, {}, {}
    for name, path in paths.items():
        run = _signature_runner(runtime, path, threads)
        start = time.perf_counter()
        try:
            logits = run("serving_default", {INPUT: ids})[OUTPUT]
        except Exception as error:  # noqa: BLE001 - the failure is this model's result
            results[name] = {
                "ok": False,
                "failure": "oom" if _out_of_memory(runtime, repr(error)) else "error",
                "message": repr(error)[-500:],
                "failed_after_s": time.perf_counter() - start,
            }
            continue
        first[name] = time.perf_counter() - start
        if logits.shape != (1, length, VOCAB) or not np.isfinite(logits).all():
            raise RuntimeError(f"{name}: bad logits, shape {logits.shape}")
        calls[name] = lambda run=run: run("serving_default", {INPUT: ids})
    # Long trials repeat less, within the time budget (at least 3 rounds after a warm-up one).
    round_s = sum(first.values())  # the first calls are the slowest (graph and arena set-up)
    repeats = max(3, min(max_repeats, int(time_budget_s // max(round_s, 1e-3))))
    for name, timing in time_interleaved(calls, warmup=1, repeats=repeats).items():
        if "error" in timing:
            results[name] = {"ok": False, "failure": "error", "message": timing["error"]}
        else:
            results[name] = {**_summary(timing, length), "first_s": first[name]}
    return {
        "ok": True,
        "models": results,
        "repeats": repeats,
        "base_rss_gib": base_rss,
        "hwm_rss_gib": status_gib("VmHWM"),
    }


def decode_trial(runtime, paths, context, threads, repeats, steps_per_call, seed=0):
    """Decodes `context` tokens step by step with each model, then times steps from that state.

    Each timed call runs `steps_per_call` steps from the kept state (the same token at position
    `context`); the models are timed interleaved.
    """
    import numpy as np

    tokens = np.random.default_rng(seed).integers(1, VOCAB, (context + 1,)).astype(np.int32)
    calls, details = {}, {}
    for name, path in paths.items():
        run = _signature_runner(runtime, path, threads)
        state = run("initial_state", {"batch_size": np.array(1, np.int32)})
        names = sorted(state)
        start = time.perf_counter()
        for t in range(context):
            out = run(
                "decode_step",
                {INPUT: tokens[t : t + 1], "position": np.array([t], np.int32), **state},
            )
            state = {key: out[key] for key in names}
        prefill_s = time.perf_counter() - start
        step_inputs = {
            INPUT: tokens[context : context + 1],
            "position": np.array([context], np.int32),
            **state,
        }

        def call(run=run, step_inputs=step_inputs):
            for _ in range(steps_per_call):
                run("decode_step", step_inputs)

        calls[name] = call
        details[name] = {
            "prefill_s": prefill_s,
            "prefill_step_s": prefill_s / context,
            "state_bytes": int(sum(value.nbytes for value in state.values())),
        }
    results = {}
    for name, timing in time_interleaved(calls, warmup=1, repeats=repeats).items():
        if "error" in timing:
            results[name] = {"ok": False, "failure": "error", "message": timing["error"]}
            continue
        results[name] = {
            "ok": True,
            **details[name],
            "step_s": timing["min_s"] / steps_per_call,
            "step_median_s": timing["median_s"] / steps_per_call,
            "step_cpu_s": timing["cpu_min_s"] / steps_per_call,
            "times_s": timing["times_s"],
        }
    return {"ok": True, "models": results, "hwm_rss_gib": status_gib("VmHWM")}


def _run_trial(kind, **spec):
    trials = {"forward": forward_trial, "decode": decode_trial, "convert": convert_trial}
    return trials[kind](**spec)


def trial(kind, *, memory_limit_gb, timeout_s, **spec):
    """Runs one trial in a capped child process (with its peak RSS and exit status)."""
    return run_in_capped_child(
        __file__,
        {**spec, "kind": kind},
        memory_limit_gb=memory_limit_gb,
        timeout_s=timeout_s,
        env={"KERAS_BACKEND": "tensorflow"},
    )


# ----------------------------------------------------------------------------------------------
# The run (parent).


def _tokens_per_s(result):
    return result["tokens_per_s"] if result.get("ok") else None


def forward(args, models, memory_limit_gb):
    """Rows {runtime, length, favor, exact, floor, ratios} over runtimes and lengths."""
    rows = []
    for runtime in RUNTIMES:
        exact_failed = None  # exact ran out of memory (or failed) at a shorter length
        for length in args.lengths:
            row = {"runtime": runtime, "length": length}
            for group in FORWARD_GROUPS:
                if group == ("exact",) and exact_failed:
                    row["exact"] = {
                        "ok": False,
                        "failure": "skipped",
                        "message": f"exact failed at L={exact_failed}",
                    }
                    continue
                print(f"  {runtime} L={length} {'+'.join(group)} ...", end=" ", flush=True)
                result = trial(
                    "forward",
                    runtime=runtime,
                    paths={name: models[name][runtime] for name in group},
                    length=length,
                    threads=args.threads,
                    time_budget_s=args.time_budget,
                    max_repeats=args.repeats,
                    memory_limit_gb=memory_limit_gb,
                    timeout_s=args.trial_timeout,
                )
                for name in group:
                    # A child that died (e.g. killed for memory) has no per-model results.
                    entry = result["models"][name] if result["ok"] else dict(result)
                    entry["trial_peak_rss_gib"] = result["peak_rss_gib"]
                    row[name] = entry
                cells = [
                    f"{name} {fmt(_tokens_per_s(row[name]), ',.0f')} tok/s"
                    if row[name]["ok"]
                    else f"{name} {row[name]['failure'].upper()}"
                    for name in group
                ]
                print(f"{', '.join(cells)}, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
            if not row["exact"]["ok"] and exact_failed is None:
                exact_failed = length
            favor = _tokens_per_s(row["favor"])
            row["favor_over_exact"] = ratio(favor, _tokens_per_s(row["exact"]))
            row["favor_over_floor"] = ratio(favor, _tokens_per_s(row["floor"]))
            rows.append(row)
    return rows


def decode(args, models, memory_limit_gb):
    """{runtime: trial result with "favor_over_floor"}: decode-step latency from a context."""
    results = {}
    for runtime in RUNTIMES:
        print(f"  {runtime} decode: {args.context} steps, then timed steps ...", end=" ")
        result = trial(
            "decode",
            runtime=runtime,
            paths={name: models[name][runtime] for name in DECODE_MODELS},
            context=args.context,
            threads=args.decode_threads,
            repeats=args.decode_repeats,
            steps_per_call=args.steps_per_call,
            memory_limit_gb=memory_limit_gb,
            timeout_s=args.trial_timeout,
        )
        if result["ok"]:
            steps = {name: result["models"][name].get("step_s") for name in DECODE_MODELS}
            result["favor_over_floor"] = ratio(steps["favor"], steps["floor"])
            print(", ".join(f"{n} {fmt(s and 1e3 * s, '.3f')} ms" for n, s in steps.items()))
        else:
            print(result["failure"])
        results[runtime] = result
    return results


def _cell(result):
    if result.get("ok"):
        return f"{result['tokens_per_s']:,.0f}"
    return result["failure"].upper()


def report(rows, decoded, args):
    print(
        "\nForward (serving_default), batch 1: tokens/s (L / fastest call; higher is better). "
        f"SavedModel: TF C API session; TFLite: LiteRT, {args.threads} threads"
    )
    header = (
        f"{'runtime':>11} {'L':>6} | {'favor':>9} {'exact':>9} {'floor':>9} | "
        f"{'favor/exact':>11} {'favor/floor':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['runtime']:>11} {row['length']:>6} | {_cell(row['favor']):>9} "
            f"{_cell(row['exact']):>9} {_cell(row['floor']):>9} | "
            f"{fmt(row['favor_over_exact'], '.2f'):>11} {fmt(row['favor_over_floor'], '.2f'):>11}"
        )
    print(
        f"\nDecode step (decode_step, batch 1) after a context of {args.context} tokens: ms per "
        f"token (fastest of {args.decode_repeats} calls of {args.steps_per_call} steps). "
        f"TFLite: {args.decode_threads} thread(s)"
    )
    header = f"{'runtime':>11} | {'favor ms':>9} {'floor ms':>9} | {'favor/floor':>11}"
    print(header)
    print("-" * len(header))
    for runtime, result in decoded.items():
        if not result["ok"]:
            print(f"{runtime:>11} | failed: {result['failure']}: {result.get('message', '')[:200]}")
            continue
        models = result["models"]
        cells = [
            fmt(models[name].get("step_s") and 1e3 * models[name]["step_s"], ".3f")
            for name in DECODE_MODELS
        ]
        print(
            f"{runtime:>11} | {cells[0]:>9} {cells[1]:>9} | "
            f"{fmt(result['favor_over_floor'], '.2f'):>11}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, a smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, default=None, help="tokens before the decode step")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="LiteRT threads of the forward pass"
    )
    parser.add_argument(
        "--decode-threads", type=int, default=1, help="LiteRT threads of the decode step"
    )
    parser.add_argument("--repeats", type=int, default=10, help="most timed rounds per trial")
    parser.add_argument(
        "--time-budget", type=float, default=60.0, help="seconds of timed rounds per trial"
    )
    parser.add_argument("--decode-repeats", type=int, default=20)
    parser.add_argument("--steps-per-call", type=int, default=50)
    parser.add_argument("--check-length", type=int, default=300, help="tokens of the export check")
    add_trial_arguments(parser)
    args = parser.parse_args(argv)
    if args._trial:
        child_trial_main(args._trial, _run_trial)
        return
    if args.lengths is None:
        args.lengths = [256, 512] if args.quick else [2048, 8192, 32768]
    if args.context is None:
        args.context = 256 if args.quick else 2048
    if args.quick:
        args.repeats, args.time_budget = 3, 5.0
        args.decode_repeats, args.steps_per_call = 5, 10
    args.lengths = sorted(args.lengths)

    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    memory_limit_gb = capped_memory_limit_gb(args.memory_limit_gb)
    print(f"memory cap per trial: {memory_limit_gb:.1f} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        print("exporting and checking the three models ...", flush=True)
        converted = trial(
            "convert",
            directory=tmp,
            check_length=args.check_length,
            memory_limit_gb=0,
            timeout_s=args.trial_timeout,
        )
        if not converted["ok"]:
            raise SystemExit(f"export failed: {converted['message']}")
        models = converted["models"]
        for name, model in models.items():
            errors = ", ".join(f"{k} {v:.1e}" for k, v in model["max_abs_error"].items())
            print(f"  {name}: {model['parameters']:,} parameters; max |export - Keras|: {errors}")
        rows = forward(args, models, memory_limit_gb)
        decoded = decode(args, models, memory_limit_gb)
    report(rows, decoded, args)

    arguments = converted["arguments"]
    settings = dict(
        models={
            "favor": "examples/quickstart.py build_model with main()'s defaults",
            "exact": "the same with attention_type='softmax' (MultiHeadAttention, causal mask) "
            "and decay=None (softmax blocks take no state decay)",
            "floor": "the favor model with each FavorAttention core replaced by its value "
            "projection (decode: the projected value, the state passed through unchanged)",
        },
        build_model_arguments=arguments,
        weights="random, seed 0 (not the trained saved_models/quickstart.keras)",
        parameters={name: model["parameters"] for name, model in models.items()},
        max_abs_error_vs_keras={name: model["max_abs_error"] for name, model in models.items()},
        tflite_bytes={name: model["tflite_bytes"] for name, model in models.items()},
        saved_model="keras_favor.export.export_saved_model; run with SavedModelSession "
        "(TF C API TF_LoadSessionFromSavedModel + TF_SessionRun, TF's default thread pools)",
        tflite="keras_favor.export.export_tflite, float32, builtin ops only; LiteRT Interpreter "
        "(XNNPACK); the exact model converted with explicit_causal_mask",
        batch_size=1,
        lengths=args.lengths,
        context=args.context,
        threads=args.threads,
        decode_threads=args.decode_threads,
        repeats=args.repeats,
        time_budget_s=args.time_budget,
        decode_repeats=args.decode_repeats,
        steps_per_call=args.steps_per_call,
        memory_limit_gib=memory_limit_gb,
        quick=args.quick,
    )
    data = {**run_info(**settings), "forward": rows, "decode": decoded}
    path = write_json("serving_inference_quick" if args.quick else "serving_inference", data)
    print(f"\nwrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
