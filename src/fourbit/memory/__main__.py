"""python -m fourbit.memory '{"model": ..., "batch": ...}' [model_path [counter]]: one measured step, as JSON."""

import json
import sys

from fourbit.memory import Plan, measure_step

args = sys.argv[1:] + [None, None]
print(json.dumps(measure_step(Plan(**json.loads(args[0])), args[1], counter=args[2])))
