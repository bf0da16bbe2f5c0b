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

A request may hold several images (a batch axis of N: what the front's coalescing sends,
docs/serving.md "Coalescing"); its answer stacks theirs, padded to the longest tag list, and one
refused image refuses the whole request (the front then sends each image alone).

Parameters (config.pbtxt): engine (onnx | torch | tensorrt), threshold, score_method, max_tags,
intra_op_threads (onnx), dtype (torch), decode_threads, model_batch; multi_image_requests (always
"true": tells the front it may coalesce requests for this model).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD
from ttd.runtime import load_tagger
from ttd.runtime.images import ImageError
from ttd.serve.tagger_requests import MAX_IMAGE_BYTES, answer_arrays, parse_request, request_rows, stacked_answer
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

    def _prepare(self, read):
        """(uint8 image [S, S, 3], tags) of one image whose inputs `read` gives; ValueError names a bad one."""
        parsed = parse_request(read, self.size, self.max_tags, self.max_image_bytes)
        image = parsed.rgb if parsed.rgb is not None else self.tagger.preprocess(parsed.encoded, "image")
        return image, parsed.tags

    def _tag(self, ready, masks, rows, failed):
        """Tag the prepared images `ready` [(request, row, image, tags)] in one Tagger call, the
        answer of each into rows[request][row] (or the failure into failed[request]); masks[request]:
        whether that request asked for masks."""
        try:
            results = self.tagger.tag(np.stack([r[2] for r in ready]), [r[3] for r in ready],
                                      any(masks[r[0]] for r in ready))
        except Exception as error:
            for index, *_ in ready:
                failed[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"tagging failed ({type(error).__name__}: {error})"))
            return
        for (index, row, _, tags), result in zip(ready, results):
            rows[index][row] = answer_arrays(tags, result.scores, result.selected,
                                             result.masks if masks[index] else None)

    def execute(self, requests):
        # every image of every request (a request may hold several: docs/serving.md, "Coalescing")
        failed, rows, images, masks = {}, {}, [], {}
        for index, request in enumerate(requests):
            try:
                readers = request_rows(lambda name, r=request: input_array(r, name))
            except ValueError as error:
                failed[index] = client_error(str(error))
                continue
            wanted = input_array(request, "return_masks")  # masks for every image when any asks
            masks[index] = wanted is not None and bool(wanted.any())
            rows[index] = [None] * len(readers)
            images += [(index, row, read) for row, read in enumerate(readers)]
        if self.decode is not None:
            pending = [(index, row, self.decode.submit(self._prepare, read).result) for index, row, read in images]
        else:
            pending = [(index, row, lambda read=read: self._prepare(read)) for index, row, read in images]
        ready = []
        for index, row, prepared in pending:
            if index in failed:  # an earlier image of its request was refused
                continue
            where = f"image {row} of {len(rows[index])}: " if len(rows[index]) > 1 else ""
            try:
                image, tags = prepared()
            except (ImageError, ValueError, UnicodeDecodeError) as error:
                failed[index] = client_error(where + str(error))
                continue
            except Exception as error:  # unexpected: its type and message, never a traceback
                failed[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{where}request could not be prepared ({type(error).__name__}: {error})"))
                continue
            ready.append((index, row, image, tags))
            if len(ready) == self.model_batch:  # the pool goes on decoding the rest meanwhile
                self._tag(ready, masks, rows, failed)
                ready = []
        if ready:
            self._tag(ready, masks, rows, failed)
        return [failed[index] if index in failed else pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, array) for name, array in stacked_answer(rows[index])])
                for index in range(len(requests))]

    def finalize(self):
        if self.decode is not None:
            self.decode.shutdown(wait=False, cancel_futures=True)
