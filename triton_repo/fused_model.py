"""ttd_tagger, fused flavour: one Python-backend model that holds the runtime's backend and
Tagger and runs decode -> image encoder -> tag head -> records in its own process.

Nothing dense leaves it: pixels, patch embeddings and tag embeddings stay in this process (on
the instance's GPU with the torch or TensorRT backend), where the BLS tagger of the python
flavour sent them through three other models as numpy tensors. The cosine maps are computed only
for a batch in which a request asks for masks. Scores and selections are the runtime Tagger's,
so they are the ones `ttd tag` writes for the same export, score and threshold (docs/serving.md,
"The fused flavour").

Images come as encoded bytes (`image`) or as uint8 RGB already at the model's size
(`image_rgb`), never as float pixels. Decoding runs in a thread pool of `decode_threads` (PIL
releases the GIL): every request of a batch is submitted at once, and the model starts on the
first `model_batch` images while the pool decodes the rest, so decoding overlaps the model.
With `decode_threads` 0 each request is decoded in execute's own thread.

Parameters (config.pbtxt): engine (onnx | torch | tensorrt), threshold, score_method, max_tags,
intra_op_threads (onnx), dtype (torch), decode_threads, model_batch.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD
from ttd.runtime import load_tagger
from ttd.runtime.images import ImageError
from ttd.serve.tagger_requests import MAX_IMAGE_BYTES, answer_arrays, parse_request
from ttd.serve.triton_stub import client_error, input_array

# what `ttd triton build --graph-engine` names -> the runtime backend (ttd/runtime/backends.py)
BACKENDS = {"onnx": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}
EXPORT_FOLDER = "export"  # the export's files, copied beside this model.py by `ttd triton build`


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        engine = parameters.get("engine", "onnx")
        options = {"export_dir": str(folder / EXPORT_FOLDER), "device": device, "warn_unfitted": False,
                   "threshold": float(parameters.get("threshold", DEFAULT_THRESHOLD)),
                   "score_method": parameters.get("score_method", DEFAULT_SCORE_METHOD)}
        if engine == "onnx":
            options["threads"] = int(parameters.get("intra_op_threads", "1"))
        if engine == "torch":
            options["dtype"] = parameters.get("dtype", "fp32")
        self.tagger = load_tagger(BACKENDS[engine], **options)
        self.size = self.tagger.config.image_size
        self.max_tags = int(parameters.get("max_tags", "1024"))
        self.max_image_bytes = int(parameters.get("max_image_bytes", str(MAX_IMAGE_BYTES)))
        self.model_batch = max(1, int(parameters.get("model_batch", "8")))
        threads = int(parameters.get("decode_threads", "2"))
        self.decode = ThreadPoolExecutor(threads, thread_name_prefix="ttd-decode") if threads > 0 else None

    def _prepare(self, request):
        """(uint8 image [S, S, 3], tags, masks wanted) of one request; ValueError names a bad one."""
        parsed = parse_request(lambda name: input_array(request, name), self.size, self.max_tags, self.max_image_bytes)
        image = parsed.rgb if parsed.rgb is not None else self.tagger.preprocess(parsed.encoded, "image")
        return image, parsed.tags, parsed.wants_masks

    def _tag(self, ready, responses):
        """Tag the prepared requests `ready` [(index, image, tags, masks wanted)] in one Tagger call."""
        try:
            results = self.tagger.tag(np.stack([r[1] for r in ready]), [r[2] for r in ready],
                                      any(r[3] for r in ready))
        except Exception as error:
            for index, *_ in ready:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"tagging failed ({type(error).__name__}: {error})"))
            return
        for (index, _, tags, wants_masks), result in zip(ready, results):
            arrays = answer_arrays(tags, result.scores, result.selected, result.masks if wants_masks else None)
            responses[index] = pb_utils.InferenceResponse([pb_utils.Tensor(name, a) for name, a in arrays])

    def execute(self, requests):
        responses = [None] * len(requests)
        if self.decode is not None:
            pending = [self.decode.submit(self._prepare, r).result for r in requests]
        else:
            pending = [lambda r=r: self._prepare(r) for r in requests]
        ready = []
        for index, prepared in enumerate(pending):
            try:
                image, tags, wants_masks = prepared()
            except (ImageError, ValueError, UnicodeDecodeError) as error:
                responses[index] = client_error(str(error))
                continue
            except Exception as error:  # unexpected: its type and message, never a traceback
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request could not be prepared ({type(error).__name__}: {error})"))
                continue
            ready.append((index, image, tags, wants_masks))
            if len(ready) == self.model_batch:  # the pool goes on decoding the rest meanwhile
                self._tag(ready, responses)
                ready = []
        if ready:
            self._tag(ready, responses)
        return responses

    def finalize(self):
        if self.decode is not None:
            self.decode.shutdown(wait=False, cancel_futures=True)
