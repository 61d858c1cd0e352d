"""The memory planner behind `fourbit memory`: `plan` (the run's settings, the arithmetic of what is
held, the prediction and fit search), `trace` (a training step simulated on the meta device) and
`measure` (a real step, measured: what the prediction is held to)."""

from fourbit.memory.measure import measure_step
from fourbit.memory.plan import (ACTIVATIONS, BACKWARD_TEMPS, CUDA_RUNTIME, DEQUANT_BUFFER, FORWARD_TEMPS,
                                 LOADED_PARTS, LORA_GRADIENTS, LORA_PARAMETERS, LOSS_TEMPS, OPTIMIZER_STATES,
                                 OTHER_WEIGHTS, STEP_TEMPS, WEIGHTS_4BIT, WEIGHTS_16BIT, Plan, Predictor,
                                 dtype_flag, load_architecture, parse_size, predict, predicted_allocated,
                                 predicted_step_growth,
                                 shipped_configs)

__all__ = ["Plan", "Predictor", "predict", "predicted_step_growth", "predicted_allocated", "load_architecture", "parse_size",
           "shipped_configs", "measure_step", "dtype_flag", "WEIGHTS_4BIT", "WEIGHTS_16BIT", "OTHER_WEIGHTS",
           "LORA_PARAMETERS", "LORA_GRADIENTS", "OPTIMIZER_STATES", "DEQUANT_BUFFER", "CUDA_RUNTIME", "ACTIVATIONS",
           "FORWARD_TEMPS", "LOSS_TEMPS", "BACKWARD_TEMPS", "STEP_TEMPS", "LOADED_PARTS"]
