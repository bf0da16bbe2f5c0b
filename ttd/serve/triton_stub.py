"""What the served Python models (triton_repo/*_model.py) share that needs Triton's stub module:
an error response the client caused, and a request's input as an array. `triton_python_backend_utils`
exists only inside tritonserver's Python stub; elsewhere this module imports but is not used."""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ModuleNotFoundError:  # outside tritonserver: nothing here is called
    pb_utils = None


def client_error(message: str) -> Any:
    """An error response the client caused (HTTP 400 where the server supports error codes)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


def input_array(request: Any, name: str) -> np.ndarray | None:
    """The request's input `name` as an array, None when it was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
