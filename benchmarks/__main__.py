"""`python -m benchmarks NAME [ARGS]`: runs benchmarks/NAME.py's main with ARGS.

Names: approximation, causal_bound, gpu_speed, layer_speed, local_window_cost, long_context,
ops_speed, pretrained_compat, scaling, serving_inference, tflite_inference.
Each writes JSON (and PNG plots where it has them) under benchmarks/results/.
"""

import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = sorted(
    name[:-3]
    for name in os.listdir(HERE)
    if name.endswith(".py") and not name.startswith("_") and name != "common.py"
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in NAMES:
        print(__doc__)
        print("available:", ", ".join(NAMES))
        return 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    sys.argv = [f"benchmarks/{argv[0]}.py", *argv[1:]]
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
