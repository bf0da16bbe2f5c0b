"""Python-backend model that runs one graph of a TTD export, with one of two engines:

- `onnxruntime` (parameter engine): `model.onnx` in the version folder, on the CPU — for servers
  with the Python backend only (like the one nvidia-pytriton bundles);
- `torch`: the export's weights (`model.safetensors` + `model.json`) through the library's own
  TorchBackend, on the instance's GPU for KIND_GPU instances — GPU serving without TensorRT or
  onnxruntime-gpu. Each torch graph model holds its own copy of the weights.

Input and output names come from config.pbtxt. Requests that the dynamic batcher grouped are
concatenated into one call.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ttd.serve.triton_stub import client_error


def _onnxruntime_engine(folder: Path, parameters: dict, inputs: list, outputs: list):
    import onnxruntime as ort

    from ttd.runtime.onnxruntime_backend import session_options

    options = session_options(parameters.get("precision", "fp32"), True, int(parameters.get("intra_op_threads", "1")))
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(outputs, feeds)


def _torch_engine(folder: Path, parameters: dict, inputs: list, args: dict):
    from ttd.model.contract import IMAGE_ENCODER, TAG_HEAD, TEXT_ENCODER
    from ttd.model.factory import load_checkpoint
    from ttd.runtime.backend import HeadRequest
    from ttd.runtime.torch_backend import TorchBackend

    gpu = args.get("model_instance_kind") == "GPU"
    device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
    backend = TorchBackend(load_checkpoint(folder / "model.safetensors"), device, parameters.get("dtype", "fp32"))
    graph = {IMAGE_ENCODER.name: backend.encode_images, TEXT_ENCODER.name: lambda ids: (backend.encode_texts(ids),),
             TAG_HEAD.name: lambda views, *tags: backend.score_tags(views, HeadRequest(*tags, with_cosines=True)),
             }[parameters["graph"]]
    return lambda feeds: graph(*(feeds[name] for name in inputs))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        if parameters.get("engine", "onnxruntime") == "torch":
            self.engine = _torch_engine(folder, parameters, self.inputs, args)
        else:
            self.engine = _onnxruntime_engine(folder, parameters, self.inputs, self.outputs)
        # a request may not grow a variable dimension (the tag count) past the tagger's own cap:
        # called directly with 200,000 tags, an engine would keep a GB-sized arena for good
        self.max_variable_dim = int(parameters.get("max_variable_dim", "1024"))
        self.variable = {i["name"]: [k for k, d in enumerate(i["dims"]) if int(d) == -1] for i in config["input"]}

    def _check(self, request):
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            shape = tensor.as_numpy().shape[1:]
            for k in self.variable[name]:
                if k < len(shape) and shape[k] > self.max_variable_dim:
                    raise ValueError(f"input {name!r}: dimension {k + 1} is {shape[k]}, more than the limit of "
                                     f"{self.max_variable_dim}")

    def _run(self, requests):
        feeds = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs}
        sizes = [len(a) for a in feeds[self.inputs[0]]]
        results = self.engine({k: np.concatenate(v) for k, v in feeds.items()})
        bounds = np.cumsum([0] + sizes)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(out[a:b])) for n, out in zip(self.outputs, results)])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    def execute(self, requests):
        refused = {}
        for i, request in enumerate(requests):
            try:
                self._check(request)
            except ValueError as error:
                refused[i] = client_error(str(error))
        if refused:
            return [refused[i] if i in refused else self.execute([r])[0] for i, r in enumerate(requests)]
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
