"""The synthetic world's words and the config of the small CLIP learned on it (docs/architecture.md §3.6).

Here, below ttd.data, so that the factory can create the registered world model without
importing the data package; ttd/data/world.py draws its images and captions from these words.
"""

from __future__ import annotations

from ttd.model.config import ModelConfig

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
}
BACKGROUNDS = {
    "grass": (70, 120, 50),
    "sand": (200, 180, 130),
    "water": (50, 110, 160),
    "stone": (120, 120, 120),
    "snow": (225, 230, 235),
}
ABSENT_THINGS = ("tree", "car", "dog", "house", "person", "boat", "cloud", "bird")
FILLER_WORDS = ("photo", "picture", "view", "scene", "image", "nice", "beautiful", "bright", "small", "big",
                "floating", "resting", "shown", "drawn", "lying", "today")
FUNCTION_WORDS = ("a", "an", "the", "and", "with", "on", "of", "next", "to", "near", "in", "there", "is", "are",
                  "some", "above", "below", "beside", "two", "three", "several")
TAG_TEMPLATES = ("{}", "a {}", "the {}")


def vocabulary() -> list[str]:
    """Every word a world caption or tag prompt can contain."""
    words = [*SHAPES, *COLOURS, *BACKGROUNDS, *ABSENT_THINGS, *FILLER_WORDS, *FUNCTION_WORDS]
    return list(dict.fromkeys(words))


def world_model_config(width: int = 128, layers: int = 4, embed_dim: int = 128) -> ModelConfig:
    """The tiny open_clip ViT (average-pooled vision tower) that the world is learned with."""
    vocab = vocabulary()
    return ModelConfig(
        name="world-tiny",
        source="registered:world-tiny",
        model_cfg={
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": width, "layers": layers,
                           "head_width": 32, "pool_type": "avg"},
            "text_cfg": {"context_length": 32, "vocab_size": len(vocab) + 4, "width": width, "heads": width // 32,
                         "layers": layers},
        },
        tokenizer={"kind": "words", "vocabulary": vocab},
        dense_mode="avg",
        image_size=IMAGE_SIZE,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        prompt_templates=TAG_TEMPLATES,
    )
