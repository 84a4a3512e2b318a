"""FavorAttention vs cuDNN flash attention on the GPU (JAX backend): training speed up to L=131072.

Forward + backward (loss = mean(y²) in float32; gradients for every trainable weight and for the
input) of one attention layer on one sequence, B=1, E=512, N=8, key_dim=64, M=256 random features
("softmax_positive"), non-causal and causal, L = 1024 ... 131072. Each step is one `jax.jit`
function built on `layer.stateless_call`, compiled ahead of time. Series:

- layer level: `FavorAttention` under the "mixed_bfloat16" policy (bfloat16 input and projections;
  features and sums in float32) and under float32; a baseline layer with the same four EinsumDense
  projections as `keras.layers.MultiHeadAttention` whose core is `keras.ops.dot_product_attention`
  with `flash_attention=True` (cuDNN flash attention; needs bfloat16, so "mixed_bfloat16" too), and
  the same with `flash_attention=False` (XLA exact attention, (N, L, L) scores) where the scores fit
  (4 * N * L² * 4 bytes < 60 % of the device memory);
- core level: `keras_favor.ops.favor_attention` vs `keras.ops.dot_product_attention` on
  (1, L, 8, 64) bfloat16 query, key and value, gradients for all three.

Per case: trace and compile time, median and min of ≥ 5 timed steps (after 2 warm-up steps, each
step ended by `jax.block_until_ready`), XLA's memory analysis of the compiled step (argument +
output + temp bytes), the device allocator's peak after the case (monotone over the run: an upper
bound), and for the dot-product series which implementation the compiled step contains (a cuDNN
fused-attention custom call or not: Keras falls back to XLA silently when cuDNN refuses). A failed
case (out of memory, cuDNN unsupported) is recorded and the run goes on; after an out-of-memory a
series skips the longer lengths. New cases stop once `--time-budget-s` has passed or the next case
of a series is predicted to overrun it. On a CPU, flash attention is off (recorded).

The flash series try, per case, `flash_attention=True`; if that raises or compiles without a cuDNN
call, `jax.nn.dot_product_attention(..., implementation="cudnn")` directly ("jax_cudnn"); if that
fails too, `flash_attention=None` (Keras' choice). Each case records the attempts and what ran.

    KERAS_BACKEND=jax python benchmarks/gpu_speed.py                  # the GPU run
    KERAS_BACKEND=jax python benchmarks/gpu_speed.py --quick --out /tmp/gpu   # smoke run
    python benchmarks/gpu_speed.py --plot-only benchmarks/results/gpu_speed.json   # re-plot

Writes `<out>/gpu_speed.json` after every case (default out: benchmarks/results) and, at the end,
`<out>/gpu_speed.png` (time vs L, log-log, layer level on top, core level below) and prints a table
with the ratio of each baseline to FavorAttention (bfloat16) per length. Needs no TensorFlow.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "jax")
# JAX preallocates 75 % of the GPU memory by default; give the allocator more room for long L.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

from benchmarks.common import RESULTS_DIR, memory_gib, run_info, write_json  # noqa: E402

EMBED_DIM = 512
NUM_HEADS = 8
KEY_DIM = 64
NUM_RANDOM_FEATURES = 256
FEATURE_MAP = "softmax_positive"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (256, 512)
EXACT_MEMORY_FRACTION = 0.6  # XLA exact attention runs where 4 * N * L² * 4 bytes fit in this
JSON_NAME = "gpu_speed.json"
FLASH_ATTEMPTS = [True, "jax_cudnn", None]  # flash series on a GPU, in this order
CUDNN = (True, "jax_cudnn")  # attempts that must compile to a cuDNN call
PNG_NAME = "gpu_speed.png"

# name -> (level, kind, policy / dtype, label, cost exponent in L for the budget prediction)
SERIES = {
    "favor_bf16": ("layer", "favor", "mixed_bfloat16", "FavorAttention (mixed_bfloat16)", 1),
    "flash_bf16": ("layer", "flash", "mixed_bfloat16", "dot_product_attention flash", 2),
    "favor_f32": ("layer", "favor", "float32", "FavorAttention (float32)", 1),
    "exact_bf16": ("layer", "exact", "mixed_bfloat16", "dot_product_attention XLA exact", 2),
    "core_favor_bf16": ("core", "favor", "bfloat16", "favor_attention core", 1),
    "core_flash_bf16": ("core", "flash", "bfloat16", "dot_product_attention flash core", 2),
}
DTYPES = {
    "favor_bf16": "policy mixed_bfloat16: input, projections and output bfloat16, weights float32; "
    "random features, their sums and the normalisation float32 (cast back to bfloat16)",
    "flash_bf16": "policy mixed_bfloat16: input, projections, attention and output bfloat16, "
    "weights float32",
    "favor_f32": "policy float32 throughout (input float32)",
    "exact_bf16": "policy mixed_bfloat16 (as flash_bf16); scores float32 inside XLA attention",
    "core_favor_bf16": "query, key, value bfloat16; projection float32; features float32",
    "core_flash_bf16": "query, key, value bfloat16",
}


# ----------------------------------------------------------------------------------------------
# The baseline layer.


def _dot_product(query, key, value, causal, flash):
    """`keras.ops.dot_product_attention`, or cuDNN through `jax.nn` when flash == "jax_cudnn"."""
    if flash == "jax_cudnn":
        import jax

        return jax.nn.dot_product_attention(
            query, key, value, is_causal=causal, implementation="cudnn"
        )
    import keras

    return keras.ops.dot_product_attention(
        query, key, value, is_causal=causal, flash_attention=flash
    )


def _baseline_layer_class():
    import keras

    class DotProductAttentionLayer(keras.layers.Layer):
        """MultiHeadAttention's four EinsumDense projections around `ops.dot_product_attention`."""

        def __init__(self, num_heads, key_dim, flash_attention=None, **kwargs):
            super().__init__(**kwargs)
            self.num_heads = num_heads
            self.key_dim = key_dim
            self.flash_attention = flash_attention

        def _dense(self, equation, output_shape, bias_axes, name):
            return keras.layers.EinsumDense(
                equation,
                output_shape=output_shape,
                bias_axes=bias_axes,
                kernel_initializer="glorot_uniform",
                bias_initializer="zeros",
                name=name,
                dtype=self.dtype_policy,
            )

        def build(self, query_shape, value_shape, key_shape=None):
            key_shape = value_shape if key_shape is None else key_shape
            heads = (None, self.num_heads, self.key_dim)
            self.query_dense = self._dense("abc,cde->abde", heads, "de", "query")
            self.query_dense.build(query_shape)
            self.key_dense = self._dense("abc,cde->abde", heads, "de", "key")
            self.key_dense.build(key_shape)
            self.value_dense = self._dense("abc,cde->abde", heads, "de", "value")
            self.value_dense.build(value_shape)
            self.output_dense = self._dense(
                "abcd,cde->abe", (None, query_shape[-1]), "e", "attention_output"
            )
            self.output_dense.build((None, None, self.num_heads, self.key_dim))

        def call(self, query, value, key=None, use_causal_mask=False, training=None):
            key = value if key is None else key
            out = _dot_product(
                self.query_dense(query),
                self.key_dense(key),
                self.value_dense(value),
                use_causal_mask,
                self.flash_attention,
            )
            return self.output_dense(out)

    return DotProductAttentionLayer


# ----------------------------------------------------------------------------------------------
# One case.


def _looks_like_oom(text):
    text = text.lower()
    return any(
        s in text
        for s in ("resource_exhausted", "resourceexhausted", "out of memory", "oom", "bad_alloc")
    )


def _memory_analysis(compiled):
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend has it
        return None
    if stats is None:
        return None
    fields = ("argument", "output", "temp", "alias", "generated_code")
    out = {f"{f}_bytes": getattr(stats, f"{f}_size_in_bytes", None) for f in fields}
    out["peak_memory_bytes"] = getattr(stats, "peak_memory_in_bytes", None)
    parts = [out["argument_bytes"], out["output_bytes"], out["temp_bytes"]]
    out["total_bytes"] = sum(parts) if all(p is not None for p in parts) else None
    return out


def _cudnn_targets(compiled):
    """Names of the cuDNN custom calls in the compiled step (empty: XLA attention)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    return sorted(set(re.findall(r"__cudnn\$\w+", text)))


def _build_step(series, length, causal, flash):
    """(step function, its arguments) for one case; the step returns (loss, gradients)."""
    import jax
    import jax.numpy as jnp
    import keras

    import keras_favor

    level, kind, dtype, _, _ = SERIES[series]
    keras.utils.set_random_seed(0)
    rng = jax.random.PRNGKey(0)
    if level == "core":
        shape = (1, length, NUM_HEADS, KEY_DIM)
        q, k, v = (
            (0.5 * jax.random.normal(r, shape, "float32")).astype(dtype)
            for r in jax.random.split(rng, 3)
        )

        if kind == "favor":
            w = keras_favor.ops.random_features_matrix(NUM_RANDOM_FEATURES, KEY_DIM, seed=0)

            def attend(q, k, v):
                return keras_favor.ops.favor_attention(q, k, v, FEATURE_MAP, w, causal=causal)

        else:

            def attend(q, k, v):
                return _dot_product(q, k, v, causal, flash)

        def loss_fn(q, k, v):
            return jnp.mean(jnp.square(attend(q, k, v).astype("float32")))

        return jax.value_and_grad(loss_fn, argnums=(0, 1, 2)), (q, k, v)

    if kind == "favor":
        layer = keras_favor.FavorAttention(
            NUM_HEADS, KEY_DIM, num_random_features=NUM_RANDOM_FEATURES, seed=0, dtype=dtype
        )
    else:
        layer = _baseline_layer_class()(NUM_HEADS, KEY_DIM, flash_attention=flash, dtype=dtype)
    input_dtype = "float32" if dtype == "float32" else "bfloat16"
    x = (0.5 * jax.random.normal(rng, (1, length, EMBED_DIM), "float32")).astype(input_dtype)
    layer(x[:, :8], x[:, :8], use_causal_mask=causal)  # build
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(trainable, x, non_trainable):
        y, _ = layer.stateless_call(
            trainable, non_trainable, x, x, use_causal_mask=causal, training=True
        )
        return jnp.mean(jnp.square(y.astype("float32")))

    return jax.value_and_grad(loss_fn, argnums=(0, 1)), (trainable, x, non_trainable)


def _time_compiled(compiled, args, warmup, repeats, min_time_s, max_steps):
    import jax

    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    while len(times) < repeats or (sum(times) < min_time_s and len(times) < max_steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def run_case(series, length, causal, flash, opts, require_cudnn=False):
    """Compiles and times one case; never raises. Returns a JSON-able dict.

    With `require_cudnn`, a step that compiled without a cuDNN attention call is not timed.
    """
    import jax

    case = {"series": series, "level": SERIES[series][0], "length": length, "causal": causal}
    if SERIES[series][1] != "favor":
        case["flash_attention"] = flash
    try:
        start = time.perf_counter()
        step, args = _build_step(series, length, causal, flash)
        lowered = jax.jit(step).lower(*args)
        case["trace_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        case["compile_s"] = time.perf_counter() - start
        case["memory_analysis"] = _memory_analysis(compiled)
        if SERIES[series][1] != "favor":
            targets = _cudnn_targets(compiled)
            case["cudnn_custom_calls"] = targets
            case["attention_impl"] = None if targets is None else ("cudnn" if targets else "xla")
            if require_cudnn and not targets:
                raise RuntimeError("the compiled step has no cuDNN attention call (XLA fallback)")
        times = _time_compiled(
            compiled, args, opts.warmup, opts.repeats, opts.min_time_s, opts.max_steps
        )
        case.update(
            status="ok",
            median_s=statistics.median(times),
            min_s=min(times),
            steps=len(times),
            times_s=times,
        )
        del compiled, lowered, args, step
    except Exception as error:  # noqa: BLE001 - a failed case is a result
        message = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(error).__name__}: {error}")
        message = " ".join(message.split())
        case["status"] = "oom" if _looks_like_oom(message) else "error"
        case["message"] = message[:600]
    gc.collect()
    stats = _device_memory_stats()
    if stats:
        case["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        case["device_bytes_in_use"] = stats.get("bytes_in_use")
    return case


def _device_memory_stats():
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------
# The run.


def _cudnn_version():
    try:
        from jax._src.lib import cuda_versions

        return None if cuda_versions is None else cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001 - private API, informative only
        return None


def _machine(on_gpu_flash):
    import jax
    import jaxlib
    import keras

    device = jax.devices()[0]
    stats = _device_memory_stats() or {}
    total, _ = memory_gib()
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "compute_capability": getattr(device, "compute_capability", None),
        "cudnn_version": _cudnn_version() if device.platform == "gpu" else None,
        "device_count": jax.device_count(),
        "device_memory_bytes_limit": stats.get("bytes_limit"),
        "host_memory_gib": None if total is None else round(total, 1),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "flash_attention_enabled": on_gpu_flash,
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }


def _exact_fits(length, memory_limit):
    return 4 * NUM_HEADS * length**2 * 4 < EXACT_MEMORY_FRACTION * memory_limit


def _predicted_cost(previous, length, exponent, opts):
    """Seconds the next case of a series should take, from its last case (None: unknown)."""
    if previous is None or previous.get("status") != "ok":
        return None
    growth = (length / previous["length"]) ** exponent
    steps = opts.warmup + max(opts.repeats, previous["steps"])
    return previous["compile_s"] + previous["trace_s"] + steps * previous["median_s"] * growth


def run(opts):
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("gpu_speed.py needs KERAS_BACKEND=jax")
    platform_name = jax.devices()[0].platform
    on_gpu = platform_name == "gpu"
    flash = True if on_gpu else False
    stats = _device_memory_stats() or {}
    memory_limit = stats.get("bytes_limit")
    if memory_limit is None:
        total, _ = memory_gib()
        memory_limit = (total or 8) * 2**30
    notes = []
    if not on_gpu:
        notes.append(
            f"device platform is {platform_name!r}: flash attention disabled "
            "(flash_attention=False, XLA exact attention) in the flash series; exact_bf16 skipped"
        )
    notes.append(
        "device_peak_bytes_in_use is the allocator's peak since the process started (monotone); "
        "memory_analysis is per compiled step"
    )
    info = run_info(
        batch_size=1,
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        key_dim=KEY_DIM,
        num_random_features=NUM_RANDOM_FEATURES,
        feature_map=FEATURE_MAP,
        lengths=list(opts.lengths),
        series=list(opts.series),
        warmup=opts.warmup,
        repeats=opts.repeats,
        min_time_s=opts.min_time_s,
        max_steps=opts.max_steps,
        time_budget_s=opts.time_budget_s,
        exact_memory_fraction=EXACT_MEMORY_FRACTION,
        quick=opts.quick,
        loss="mean(y**2) in float32; gradients w.r.t. all trainable weights and the input",
    )
    result = {
        "benchmark": "gpu_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(flash),
        "info": info,
        "dtypes": {name: DTYPES[name] for name in opts.series},
        "labels": {name: SERIES[name][3] for name in SERIES},
        "notes": notes,
        "budget_exhausted": False,
        "cases": [],
    }
    path = os.path.join(opts.out, JSON_NAME)
    write_json("gpu_speed", result, path=path)
    print(f"device: {result['machine']['device_kind']} ({platform_name}); writing {path}")

    last = {}  # (series, causal) -> last case
    working = {}  # (series, causal) -> the flash attempt that worked last
    stopped = set()  # (series, causal) that ran out of memory
    order = [s for s in SERIES if s in opts.series]
    plan = [(s, L, c) for lvl in ("layer", "core") for L in opts.lengths for c in (False, True)
            for s in order if SERIES[s][0] == lvl]  # fmt: skip
    for series, length, causal in plan:
        key = (series, causal)
        base = {"series": series, "level": SERIES[series][0], "length": length, "causal": causal}
        elapsed = time.perf_counter() - _START
        if elapsed > opts.time_budget_s:
            if not result["budget_exhausted"]:
                result["budget_exhausted"] = True
                notes.append(f"time budget {opts.time_budget_s} s exhausted after {elapsed:.0f} s")
            result["cases"].append({**base, "status": "skipped", "message": "time budget"})
            continue
        if key in stopped:
            result["cases"].append({**base, "status": "skipped", "message": "OOM at shorter L"})
            continue
        if SERIES[series][1] == "exact" and not on_gpu:
            message = "no GPU: the flash series already runs XLA exact attention"
            result["cases"].append({**base, "status": "skipped", "message": message})
            continue
        if SERIES[series][1] == "exact" and not _exact_fits(length, memory_limit):
            message = f"(N, L, L) float32 scores exceed {EXACT_MEMORY_FRACTION:.0%} of memory"
            result["cases"].append({**base, "status": "skipped", "message": message})
            continue
        cost = _predicted_cost(last.get(key), length, SERIES[series][4], opts)
        if cost is not None and elapsed + cost > opts.time_budget_s:
            message = f"predicted {cost:.0f} s would overrun the time budget"
            result["cases"].append({**base, "status": "skipped", "message": message})
            continue
        kind = SERIES[series][1]
        if kind == "flash" and on_gpu:
            # Start from the attempt that last worked for this series.
            attempts = FLASH_ATTEMPTS[FLASH_ATTEMPTS.index(working.get(key, True)) :]
        else:
            attempts = [{"flash": flash, "exact": False}.get(kind)]
        failed = []
        for attempt in attempts:
            case = run_case(series, length, causal, attempt, opts, require_cudnn=attempt in CUDNN)
            if case["status"] != "error" or attempt is attempts[-1]:
                break
            failed.append({"flash_attention": attempt, "message": case["message"]})
            print(f"  {series} flash_attention={attempt!r} failed: {case['message'][:160]}")
        if failed:
            case["failed_attempts"] = failed
        if case["status"] == "ok" and kind == "flash":
            working[key] = case["flash_attention"]
        result["cases"].append(case)
        last[key] = case
        if case["status"] == "oom":
            stopped.add(key)
        write_json("gpu_speed", result, path=path)
        _print_case(case)
    result["elapsed_s"] = time.perf_counter() - _START
    write_json("gpu_speed", result, path=path)
    return result, path


def _print_case(case):
    what = f"{case['series']:<16} L={case['length']:<7} causal={case['causal']!s:<5}"
    if case["status"] == "ok":
        impl = case.get("attention_impl")
        impl = f" [{impl}]" if impl else ""
        print(
            f"{what} {case['median_s'] * 1e3:10.2f} ms  (min {case['min_s'] * 1e3:.2f}, "
            f"compile {case['compile_s']:.1f} s){impl}",
            flush=True,
        )
    else:
        print(f"{what} {case['status']}: {case.get('message', '')[:160]}", flush=True)


# ----------------------------------------------------------------------------------------------
# Table and plot.


def _times(result, level):
    """{(series, causal): {length: median_s}} of the successful cases of one level."""
    out = {}
    for case in result["cases"]:
        if case["level"] == level and case["status"] == "ok":
            out.setdefault((case["series"], case["causal"]), {})[case["length"]] = case["median_s"]
    return out


def print_table(result):
    for level, favor in (("layer", "favor_bf16"), ("core", "core_favor_bf16")):
        times = _times(result, level)
        names = [s for s in SERIES if SERIES[s][0] == level and any(k[0] == s for k in times)]
        if not names:
            continue
        others = [s for s in names if s != favor]
        print(f"\n{level} level, fwd+bwd median ms; x series = its time / {favor} time")
        header = f"{'causal':<7}{'L':>8}" + "".join(f"{s:>18}" for s in names)
        header += "".join(f"{'x ' + s.replace('core_', ''):>18}" for s in others)
        print(header)
        for causal in (False, True):
            lengths = sorted({L for (s, c), d in times.items() if c == causal for L in d})
            for length in lengths:
                row = f"{causal!s:<7}{length:>8}"
                for s in names:
                    t = times.get((s, causal), {}).get(length)
                    row += f"{t * 1e3:>18.2f}" if t is not None else f"{'-':>18}"
                ref = times.get((favor, causal), {}).get(length)
                for s in others:
                    t = times.get((s, causal), {}).get(length)
                    row += f"{t / ref:>18.2f}" if t is not None and ref else f"{'-':>18}"
                print(row)


def _impls(result):
    """{series: sorted attention implementations / flash arguments that ran} (dot-product only)."""
    out = {}
    for case in result["cases"]:
        if case["status"] == "ok" and "flash_attention" in case:
            impl = case.get("attention_impl") or "?"
            if case["flash_attention"] not in (True, False):
                impl += f", flash_attention={case['flash_attention']}"
            out.setdefault(case["series"], set()).add(impl)
    return {series: sorted(impls) for series, impls in out.items()}


def plot(result, png_path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot")
        return None
    levels = [lvl for lvl in ("layer", "core") if _times(result, lvl)]
    if not levels:
        print("no successful case: no plot")
        return None
    fig, axes = plt.subplots(
        len(levels), 2, figsize=(11, 4.2 * len(levels)), squeeze=False, sharex=True
    )
    labels = dict(result.get("labels", {}))
    for series, impls in _impls(result).items():
        labels[series] = f"{labels.get(series, series)} [{', '.join(impls)}]"
    styles = {"favor": "o-", "flash": "s-", "exact": "^--"}
    colours = {name: f"C{i}" for i, name in enumerate(SERIES)}
    for row, level in enumerate(levels):
        times = _times(result, level)
        for col, causal in enumerate((False, True)):
            ax = axes[row][col]
            for series in SERIES:
                points = times.get((series, causal))
                if not points:
                    continue
                lengths = sorted(points)
                label = labels.get(series, series)
                if series == "favor_f32":
                    style = "o:"
                else:
                    style = styles.get(SERIES.get(series, (None, "favor"))[1], "o-")
                ax.plot(
                    lengths,
                    [points[L] * 1e3 for L in lengths],
                    style,
                    color=colours[series],
                    label=label,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{level} level, {'causal' if causal else 'non-causal'}")
            ax.set_ylabel("forward + backward, ms")
            if row == len(levels) - 1:
                ax.set_xlabel("sequence length L (B=1)")
            ax.legend(fontsize=8)
    machine = result.get("machine", {})
    fig.suptitle(
        f"FavorAttention vs dot_product_attention on {machine.get('device_kind', '?')} "
        f"(JAX {machine.get('jax', '?')}, Keras {machine.get('keras', '?')}): E=512, N=8, "
        f"key_dim=64, M=256",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help=f"output folder (default {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true", help=f"L = {QUICK_LENGTHS}, a smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--series", nargs="+", choices=list(SERIES), default=list(SERIES))
    parser.add_argument("--time-budget-s", type=float, default=330.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="least number of timed steps")
    parser.add_argument(
        "--min-time-s", type=float, default=0.5, help="time more steps until this much is timed"
    )
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--plot-only", metavar="JSON", help="re-plot an existing result file")
    opts = parser.parse_args(argv)
    if opts.lengths is None:
        opts.lengths = list(QUICK_LENGTHS if opts.quick else DEFAULT_LENGTHS)
    opts.lengths = sorted(set(opts.lengths))
    if opts.quick:
        opts.min_time_s = 0.0
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if opts.plot_only:
        with open(opts.plot_only) as f:
            result = json.load(f)
        out = opts.out or os.path.dirname(os.path.abspath(opts.plot_only))
    else:
        opts.out = opts.out or RESULTS_DIR
        result, path = run(opts)
        out = opts.out
        print(f"wrote {path} ({result['elapsed_s']:.0f} s)")
    print_table(result)
    png = plot(result, os.path.join(out, PNG_NAME))
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
