"""ttd_tagger: a Python-backend (BLS) model that takes encoded image bytes and a caption (or a
list of tags) and returns the candidate tags, their pixel-tag scores, which are selected, and
optionally their masks. Decoding, preprocessing, tag extraction and tokenisation happen here; the
three graphs run in the ttd_image_encoder, ttd_text_encoder and ttd_tag_head models. It is the
library's own Tagger around a backend whose graphs are BLS calls, and its tag-embedding cache
makes repeated vocabularies cheap.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD, ModelConfig
from ttd.model.contract import IMAGE_ENCODER, TAG_HEAD, TEXT_ENCODER, ImageEmbeddings, TagHeadOutputs
from ttd.runtime.images import ImageError
from ttd.runtime.backend import tag_images_on_host
from ttd.runtime.export_dir import with_export_tokenizer
from ttd.runtime.onnxruntime_backend import head_feeds
from ttd.runtime.tagger import Tagger
from ttd.serve.tagger_requests import MAX_IMAGE_BYTES, answer_arrays, parse_request
from ttd.serve.triton_stub import client_error, input_array


class BlsBackend:
    """The three graphs of the export contract, run by the server's encoder models."""

    name = "triton-bls"

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size

    def _call(self, graph, *arrays):
        """Run `graph` (a ttd.model.contract.Graph) on the model that serves it, max_batch_size at a time."""
        chunks = []
        for start in range(0, len(arrays[0]), self.max_batch_size):
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(a[start : start + self.max_batch_size]))
                       for name, a in zip(graph.inputs, arrays)]
            response = pb_utils.InferenceRequest(model_name=graph.served_as, requested_output_names=list(graph.outputs),
                                                 inputs=tensors).exec()
            if response.has_error():
                raise RuntimeError(f"{graph.served_as}: {response.error().message()}")
            chunks.append([pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in graph.outputs])
        return tuple(np.concatenate(parts) for parts in zip(*chunks))

    def encode_images(self, pixel_values):
        return ImageEmbeddings(*self._call(IMAGE_ENCODER, pixel_values))

    def encode_texts(self, input_ids):
        return self._call(TEXT_ENCODER, input_ids)[0]

    def score_tags(self, patch_views, request):
        """Every input batched on its first axis, as Triton requires (a shared row goes to each image)."""
        batch = len(patch_views)
        feeds = [f if len(f) == batch else np.broadcast_to(f, (batch, *f.shape[1:]))
                 for f in head_feeds(patch_views, request)]
        scores, cosines = self._call(TAG_HEAD, *feeds)
        return TagHeadOutputs(scores, cosines if request.with_cosines else None)

    def tag_images(self, images, preprocessing, request):
        return tag_images_on_host(self, images, preprocessing, request)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((folder / "manifest.json").read_text())
        # the export's own tokenizer files where it has them: no torch in the server (docs/edge.md)
        model_config = with_export_tokenizer(folder, manifest,
                                             ModelConfig.from_dict(json.loads((folder / "model.json").read_text())))
        self.max_tags = int(parameters.get("max_tags", "1024"))
        self.max_image_bytes = int(parameters.get("max_image_bytes", str(MAX_IMAGE_BYTES)))
        self.tagger = Tagger(BlsBackend(int(parameters["encoder_max_batch_size"])), model_config,
                             threshold=float(parameters.get("threshold", DEFAULT_THRESHOLD)),
                             score_method=parameters.get("score_method", DEFAULT_SCORE_METHOD),
                             mask_weight=manifest["mask_weight"], mask_bias=manifest["mask_bias"])
        self.preprocess = dataclasses.replace(self.tagger.preprocess,
                                              max_pixels=int(parameters.get("max_pixels", "89478485")))

    def _prepare(self, request):
        """(preprocessed image, tags, masks wanted) of one request: the checks of every served
        tagger (ttd/serve/tagger_requests.py); this model takes encoded images only."""
        parsed = parse_request(lambda name: input_array(request, name), None, self.max_tags, self.max_image_bytes)
        return self.preprocess(parsed.encoded, "image"), parsed.tags, parsed.wants_masks

    def execute(self, requests):
        responses = [None] * len(requests)
        prepared = {}
        for i, request in enumerate(requests):
            try:
                prepared[i] = self._prepare(request)
            except (ImageError, ValueError, UnicodeDecodeError) as error:
                responses[i] = client_error(str(error))
            except Exception as error:  # unexpected: answer with its type and message, never a traceback
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request could not be prepared ({type(error).__name__}: {error})"))
        if prepared:
            keys = sorted(prepared)
            try:
                results = self.tagger.tag(np.stack([prepared[k][0] for k in keys]), [prepared[k][1] for k in keys],
                                          any(prepared[k][2] for k in keys))
            except Exception as error:
                results = None
                for k in keys:
                    responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tagging failed: {error}"))
            for k, result in zip(keys, results or []):
                arrays = answer_arrays(result.tags, result.scores, result.selected,
                                       result.masks if prepared[k][2] else None)
                responses[k] = pb_utils.InferenceResponse([pb_utils.Tensor(name, a) for name, a in arrays])
        return responses
