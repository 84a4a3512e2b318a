"""Shared helpers for the examples: a byte-level corpus present on every machine, batching, CLI.

The corpus is the Python standard library's own source code (`*.py` files under
``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded. Files are read in sorted order of
their path relative to the standard library directory (deterministic for a given Python version);
every 10th file goes to the validation split, the others to training, so no file is in both.
Tokens are the UTF-8 bytes of the text (vocabulary 256); losses in nats per byte turn into
bits per byte by dividing by ln 2.
"""

import argparse
import csv
import inspect
import json
import math
import os
import sysconfig

import keras
import numpy as np

VOCABULARY_SIZE = 256
VALIDATION_EVERY = 10  # file i goes to validation when i % VALIDATION_EVERY == VALIDATION_EVERY - 1
# Test suites (huge, repetitive), third-party packages, caches and codec tables are left out.
_SKIPPED_DIRS = ("site-packages", "dist-packages", "test", "tests", "__pycache__", "encodings")


def stdlib_dir():
    """The standard library directory of the running Python."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_source_files(root=None):
    """Paths of the standard library's `.py` files, sorted by their path relative to `root`."""
    root = stdlib_dir() if root is None else root
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d
            for d in subdirs
            if d not in _SKIPPED_DIRS and not d.startswith(("config-", "lib-dynload"))
        ]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = os.path.join(directory, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return [path for _, path in sorted(found)]


class Corpus:
    """Train and validation byte arrays of the standard library source.

    Attributes:
        train: uint8 array of the training bytes (files joined by a blank line).
        validation: uint8 array of the validation bytes.
        num_files: (train, validation) file counts.
    """

    def __init__(self, train, validation, num_files):
        self.train = train
        self.validation = validation
        self.num_files = num_files

    def __repr__(self):
        return (
            f"Corpus(train={self.train.size:,} bytes from {self.num_files[0]} files, "
            f"validation={self.validation.size:,} bytes from {self.num_files[1]} files)"
        )


def load_corpus(max_train_bytes=None, max_validation_bytes=None, root=None):
    """Loads the standard library source as byte tokens, split by file.

    Args:
        max_train_bytes: stop adding training files once this many bytes are read (the last
            file is cut), or None for all of them.
        max_validation_bytes: the same for the validation split.
        root: the directory to read (default: the standard library).

    Returns:
        A `Corpus`.
    """
    parts = {"train": [], "validation": []}
    sizes = {"train": 0, "validation": 0}
    limits = {"train": max_train_bytes, "validation": max_validation_bytes}
    counts = {"train": 0, "validation": 0}
    for index, path in enumerate(stdlib_source_files(root)):
        split = "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        limit = limits[split]
        if limit is not None and sizes[split] >= limit:
            if all(limits[s] is not None and sizes[s] >= limits[s] for s in parts):
                break
            continue
        with open(path, "rb") as f:
            text = f.read() + b"\n\n"
        if limit is not None:
            text = text[: limit - sizes[split]]
        parts[split].append(np.frombuffer(text, dtype=np.uint8))
        sizes[split] += len(text)
        counts[split] += 1
    if not parts["train"] or not parts["validation"]:
        raise ValueError(f"Too few source files found under {root or stdlib_dir()!r}.")
    return Corpus(
        np.concatenate(parts["train"]),
        np.concatenate(parts["validation"]),
        (counts["train"], counts["validation"]),
    )


def encode(text):
    """Text -> int32 byte tokens."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype("int32")


def decode(tokens):
    """Byte tokens -> text (invalid UTF-8 shown as U+FFFD)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def windows(tokens, offsets, length):
    """Inputs (N, L) and next-byte targets (N, L) of the windows starting at `offsets`."""
    index = np.asarray(offsets)[:, None] + np.arange(length + 1)[None, :]
    chunk = tokens[index].astype("int32")
    return chunk[:, :-1], chunk[:, 1:]


def validation_windows(tokens, length, max_windows=None):
    """Non-overlapping windows spread evenly over the validation bytes (deterministic).

    All the windows that fit when `max_windows` is None or large enough; otherwise
    `max_windows` windows at evenly spaced offsets, so that they sample every part of the split
    (consecutive windows from its start would all come from its first file).
    """
    fits = (tokens.size - 1) // length
    if fits < 1:
        raise ValueError(
            f"The validation split ({tokens.size} bytes) is shorter than one window of "
            f"{length + 1} bytes. Received: length={length}"
        )
    if max_windows is None or max_windows >= fits:
        offsets = np.arange(fits) * length
    else:
        offsets = (np.arange(max_windows) * fits // max_windows) * length
    return windows(tokens, offsets, length)


class RandomWindows(keras.utils.PyDataset):
    """Batches of random training windows: `steps` batches per epoch, reproducible from `seed`.

    Batch i of epoch e is drawn from `np.random.default_rng((seed, e, i))`, so any run with the
    same settings sees the same data whatever the order or number of workers.
    """

    def __init__(self, tokens, length, batch_size, steps, seed=0, **kwargs):
        super().__init__(**kwargs)
        if tokens.size <= length + 1:
            raise ValueError(
                f"The training split ({tokens.size} bytes) is shorter than one window of "
                f"{length + 1} bytes. Received: length={length}"
            )
        self.tokens = tokens
        self.length = length
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        offsets = rng.integers(0, self.tokens.size - self.length - 1, size=self.batch_size)
        return windows(self.tokens, offsets, self.length)

    def on_epoch_end(self):
        self.epoch += 1


def bits_per_byte(nats_per_byte):
    """Cross-entropy in nats per byte -> bits per byte."""
    return float(nats_per_byte) / math.log(2)


def cross_entropy(logits, targets):
    """Mean next-byte cross-entropy in nats of numpy logits (..., V) against targets (...)."""
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(axis=-1))
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return float(np.mean(log_norm - picked))


def trainable_parameters(model):
    """The number of trainable parameters (FAVOR's random projections are non-trainable)."""
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


RESULTS_FILES = ("results.json", "results.csv", "results.md")


def write_results_tables(output_dir, settings, results, columns, header_lines, row_line):
    """Writes an example's results as results.json (settings and rows), results.csv (`columns`)
    and results.md (`header_lines`, then `row_line(row)` per row); returns the three paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in RESULTS_FILES}
    with open(paths["results.json"], "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in results:
            writer.writerow([row[c] for c in columns])
    with open(paths["results.md"], "w") as f:
        f.write("\n".join([*header_lines, *(row_line(row) for row in results)]) + "\n")
    return paths


def parse_main_arguments(main, argv=None, types=None, choices=None, helps=None):
    """Parses `--option value` for every argument of `main`, with its default; returns a dict.

    `--steps 10` sets `steps`; the type is the default's (`types` overrides it, e.g. for None
    defaults), a tuple default takes several values, a bool default gives `--x` / `--no-x`.
    """
    types, choices, helps = types or {}, choices or {}, helps or {}
    doc = inspect.getdoc(inspect.getmodule(main)) or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, parameter in inspect.signature(main).parameters.items():
        default = parameter.default
        kwargs = {"default": default, "help": helps.get(name, "default: %(default)s")}
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if isinstance(default, (tuple, list)):
            kwargs.update(nargs="+", type=types.get(name, type(default[0])), default=list(default))
        else:
            kwargs["type"] = types.get(name, str if default is None else type(default))
        if name in choices:
            kwargs["choices"] = choices[name]
        parser.add_argument(flag, **kwargs)
    return vars(parser.parse_args(argv))
