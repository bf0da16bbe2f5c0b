"""Python-backend model that runs one ONNX graph of a TTD export with onnxruntime.

For servers with the Python backend only (like the one nvidia-pytriton bundles): the graph is
`model.onnx` in the version folder; input and output names come from config.pbtxt. Requests
that the dynamic batcher grouped are concatenated into one onnxruntime call.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "1"))
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def _run(self, requests):
        feeds = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs}
        sizes = [len(a) for a in feeds[self.inputs[0]]]
        results = self.session.run(self.outputs, {k: np.concatenate(v) for k, v in feeds.items()})
        bounds = np.cumsum([0] + sizes)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(out[a:b])) for n, out in zip(self.outputs, results)])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    def execute(self, requests):
        try:
            return self._run(requests)
        except Exception:  # requests of different shapes (e.g. tag counts) or one bad request: run one by one
            responses = []
            for request in requests:
                try:
                    responses.extend(self._run([request]))
                except Exception as error:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}")))
            return responses
