"""python -m fourbit.memory '{"model": ..., "batch": ...}' [model_path]: one measured step, as JSON."""

import json
import sys

from fourbit.memory import Plan, measure_step

print(json.dumps(measure_step(Plan(**json.loads(sys.argv[1])), sys.argv[2] if len(sys.argv) > 2 else None)))
