"""Export a FAVOR language model to TFLite (builtin ops only) and run it with LiteRT.

Run from the repository root:

    python examples/export_tflite.py                                      # trains a tiny model
    python examples/export_tflite.py --keras-model saved_models/quickstart.keras
    python examples/export_tflite.py --quantization float16               # or dynamic_range

1. Gets a byte-level FAVOR language model: loads a `.keras` file (for example the one
   `examples/quickstart.py` saves) or trains a tiny one for a few seconds.
2. Converts it with `keras_favor.export.export_tflite` (TFLite builtin ops only: no Flex, so the
   plain LiteRT runtime runs it) to `saved_models/favor_lm.tflite`, with the signatures
   ``serving_default`` (any batch size and length), ``initial_state`` and ``decode_step``.
3. Runs ``serving_default`` with LiteRT's `Interpreter` at several lengths (the input is resized
   to each sequence), compares with Keras, and streams a continuation through ``initial_state`` /
   ``decode_step`` (a fixed-size state, constant cost per token), checked step by step against
   the Keras forward pass.
4. Prints the LiteRT code that does the same.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from examples import data  # noqa: E402
from examples.export_tf_serving import keras_logits, load_or_train_model, stream  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "saved_models", "favor_lm.tflite")
DEFAULT_PROMPT = "def "
# Largest |logit difference| accepted against Keras. float32: rounding only (measured ~1e-5).
# Quantized weights change the function itself; they are reported, with bits per byte, unchecked.
FLOAT32_TOLERANCE = 1e-3

LITERT_USAGE = """\
import numpy as np
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path="{path}")
print(interpreter.get_signature_list())

# Full forward, any batch size and length: the signature runner resizes the input
# (resize_tensor_input + allocate_tensors) to the array it is given.
forward = interpreter.get_signature_runner("serving_default")
ids = np.frombuffer(open("some_file.py", "rb").read()[:4096], np.uint8).astype(np.int32)[None]
logits = forward(token_ids=ids)["logits"]  # (1, 4096, 256)

# Streaming: a fixed-size state in and out, one byte per call.
initial_state = interpreter.get_signature_runner("initial_state")
step = interpreter.get_signature_runner("decode_step")
state = initial_state(batch_size=np.int32(1))  # {{"state_0": ..., "state_1": ..., ...}}
tokens = list(b"def ")
for position in range(200):
    outputs = step(token_ids=np.array([tokens[position]], np.int32),
                   position=np.array([position], np.int32), **state)
    logits = outputs.pop("logits")  # (1, 256)
    state = outputs  # feed the new state back
    if position + 1 >= len(tokens):
        tokens.append(int(np.argmax(logits[0])))
print(bytes(tokens).decode("utf-8", "replace"))"""


def main(
    keras_model=None,
    output=DEFAULT_OUTPUT,
    quantization=None,
    lengths=(128, 4096),
    steps=150,
    batch_size=16,
    sequence_length=128,
    width=64,
    num_heads=4,
    num_blocks=2,
    intermediate_dim=256,
    num_random_features=32,
    max_train_bytes=2_000_000,
    prompt=DEFAULT_PROMPT,
    num_tokens=64,
    num_threads=None,
    seed=0,
    verbose=1,
):
    """Converts, runs and checks the TFLite model; returns a dict of the checks.

    Args:
        keras_model: a `.keras` language model to convert, or None to train a tiny one.
        output: the `.tflite` file to write.
        quantization: None (float32), "float16" or "dynamic_range" (int8 weights).
        lengths: sequence lengths run through ``serving_default`` and compared with Keras.
        steps, batch_size, sequence_length, width, num_heads, num_blocks, intermediate_dim,
            num_random_features, max_train_bytes: the tiny model and its training.
        prompt: the text the streamed continuation starts from.
        num_tokens: bytes generated through ``decode_step`` (greedy).
        num_threads: LiteRT interpreter threads (None: its default).
        seed: seeds the tiny model and the data.
        verbose: Keras progress bars (1) or quiet (0).
    """
    from keras_favor import export

    model = load_or_train_model(
        keras_model,
        steps=steps,
        batch_size=batch_size,
        sequence_length=sequence_length,
        width=width,
        num_heads=num_heads,
        num_blocks=num_blocks,
        intermediate_dim=intermediate_dim,
        num_random_features=num_random_features,
        max_train_bytes=max_train_bytes,
        seed=seed,
        verbose=verbose,
    )
    start = time.perf_counter()
    export.export_tflite(model, output, quantization=quantization)
    print(
        f"\nConverted to {output} ({os.path.getsize(output) / 2**20:.2f} MiB, "
        f"quantization={quantization}) in {time.perf_counter() - start:.1f} s"
    )
    runner = export.TFLiteRunner(output, num_threads=num_threads)
    for name in runner.signature_names:
        inputs, outputs = runner.signature(name)
        print(f"  signature {name}: inputs {inputs} -> outputs {outputs}")

    validation = data.load_corpus(200_000, max(lengths) + 1).validation
    if validation.size < max(lengths) + 1:
        validation = np.resize(validation, max(lengths) + 1)
    checks = []
    for length in lengths:
        ids = validation[None, :length].astype("int32")
        targets = validation[None, 1 : length + 1].astype("int32")
        expected = keras_logits(model, ids)
        begin = time.perf_counter()
        got = runner.run({"token_ids": ids})["logits"]
        seconds = time.perf_counter() - begin
        checks.append(
            {
                "length": length,
                "max_abs_difference": float(np.max(np.abs(got - expected))),
                "keras_bits_per_byte": data.bits_per_byte(data.cross_entropy(expected, targets)),
                "tflite_bits_per_byte": data.bits_per_byte(data.cross_entropy(got, targets)),
                "tflite_seconds": seconds,
            }
        )
    print("\nserving_default with LiteRT vs Keras:")
    print("  length | max |logit diff| | bits/byte Keras | bits/byte TFLite | TFLite time (s)")
    for c in checks:
        print(
            f"  {c['length']:6d} | {c['max_abs_difference']:15.2e} | "
            f"{c['keras_bits_per_byte']:15.4f} | {c['tflite_bits_per_byte']:16.4f} | "
            f"{c['tflite_seconds']:.3f}"
        )

    prompt_ids = data.encode(prompt)
    begin = time.perf_counter()
    generated, step_logits = stream(runner.run, prompt_ids, num_tokens)
    per_token = (time.perf_counter() - begin) / (len(prompt_ids) + num_tokens - 1)
    full = keras_logits(model, np.concatenate([prompt_ids, generated])[None, :-1])[0]
    decode_difference = float(np.max(np.abs(step_logits - full)))
    print(
        f"\nStreamed through the TFLite decode_step (greedy, {1000 * per_token:.2f} ms/token): "
        f"{data.decode(prompt_ids)!r} -> {data.decode(generated)!r}"
    )
    print(f"  max |logit diff| from the Keras forward at every position: {decode_difference:.2e}")

    if quantization is None:
        worst = max([c["max_abs_difference"] for c in checks] + [decode_difference])
        if not worst <= FLOAT32_TOLERANCE:
            raise RuntimeError(
                f"The float32 TFLite model disagrees with Keras: {worst} > {FLOAT32_TOLERANCE}"
            )
        print(f"  float32: every difference is within {FLOAT32_TOLERANCE}")
    print("\nRun it with LiteRT (pip install ai-edge-litert):\n")
    shown = os.path.relpath(output) if not os.path.relpath(output).startswith("..") else output
    print("\n".join("  " + line for line in LITERT_USAGE.format(path=shown).splitlines()))
    return {
        "tflite_path": output,
        "signatures": runner.signature_names,
        "checks": checks,
        "decode_difference": decode_difference,
        "generated": data.decode(generated),
    }


if __name__ == "__main__":
    main(
        **data.parse_main_arguments(
            main,
            choices={"quantization": ["float16", "dynamic_range"]},
            helps={"keras_model": "a .keras LM to convert (default: train a tiny one)"},
        )
    )
