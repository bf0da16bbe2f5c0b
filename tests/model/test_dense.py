import pytest
import torch
import torch.nn.functional as F

from ttd.model.dense import clearclip_block, encode_image_dense, maskclip_block
from ttd.model.factory import create_model


@pytest.fixture(scope="module")
def cls_model():
    """A small CLS-pooled open_clip ViT (the kind the maskclip/clearclip modes are for)."""
    model = create_model("world-tiny", seed=1)
    model.clip.visual.pool_type = "tok"
    return model


def open_clip_patch_tokens(visual, pixels, last_block_forward=None):
    """Reference patch embeddings [B, D, h, w] from open_clip's own forward (output_tokens=True),
    optionally with the last block's forward replaced, projected and normalised."""
    last = visual.transformer.resblocks[-1]
    visual.output_tokens = True
    if last_block_forward is not None:
        last.forward = last_block_forward
    try:
        _, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
        if last_block_forward is not None:
            del last.forward
    grid_h, grid_w = visual.grid_size
    patch = F.normalize(tokens @ visual.proj, dim=-1)  # [B, h*w, D], row-major patches
    return patch.reshape(pixels.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)


def test_avg_patch_embeddings_are_open_clips_projected_tokens(tiny_model):
    # batch 3 of different images: a batch/patch/channel reshape mix-up cannot match
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_embeds, patch_embeds = tiny_model.encode_image(pixels, "avg")
        expected = open_clip_patch_tokens(tiny_model.clip.visual, pixels)
    assert patch_embeds.shape == (3, 128, 8, 8) and image_embeds.shape == (3, 128)
    torch.testing.assert_close(patch_embeds, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_embeds.norm(dim=1), torch.ones(3))


def test_maskclip_patch_embeddings_match_open_clip_with_a_self_only_last_block(cls_model):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    last = cls_model.clip.visual.transformer.resblocks[-1]
    only_self = torch.full((65, 65), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        expected = open_clip_patch_tokens(cls_model.clip.visual, pixels,
                                          lambda x, **_: type(last).forward(last, x, attn_mask=only_self))
        patch_embeds = cls_model.encode_image(pixels, "maskclip")[1]
    torch.testing.assert_close(patch_embeds, expected, rtol=1e-5, atol=1e-5)
    # and the features of different images stay apart (no batch mixing)
    assert (patch_embeds[0] - patch_embeds[1]).abs().max() > 1e-2


def test_global_embedding_is_the_unmodified_towers(cls_model):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = F.normalize(cls_model.clip.encode_image(pixels), dim=-1)
        outputs = {mode: cls_model.encode_image(pixels, mode) for mode in ("avg", "maskclip", "clearclip")}
    for mode, (image_embeds, _) in outputs.items():
        torch.testing.assert_close(image_embeds, reference, rtol=0, atol=1e-6, msg=mode)
    # the dense modes do change the patch features
    assert (outputs["maskclip"][1] - outputs["avg"][1]).abs().max() > 1e-2
    assert (outputs["clearclip"][1] - outputs["maskclip"][1]).abs().max() > 1e-2


def test_maskclip_equals_attention_restricted_to_self(cls_model):
    block = cls_model.clip.visual.transformer.resblocks[-1]
    x = torch.randn(2, 65, 128, generator=torch.Generator().manual_seed(2))
    only_self = torch.full((65, 65), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        expected = block(x, attn_mask=only_self)
        torch.testing.assert_close(maskclip_block(block, x), expected, rtol=1e-5, atol=1e-5)


def test_clearclip_is_qq_attention_without_residual_or_mlp(cls_model):
    block = cls_model.clip.visual.transformer.resblocks[-1]
    # batch 2 with different tokens: a batch/head reshape mix-up would mix the two images
    x = torch.randn(2, 65, 128, generator=torch.Generator().manual_seed(3))
    heads, dim = block.attn.num_heads, 128 // block.attn.num_heads
    with torch.no_grad():
        expected = []
        for image in x:  # one image at a time, heads split by hand
            h = block.ln_1(image)
            q, _, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            q = q.reshape(65, heads, dim).transpose(0, 1)
            v = v.reshape(65, heads, dim).transpose(0, 1)
            attention = torch.softmax(q @ q.transpose(1, 2) / dim**0.5, dim=-1)
            expected.append(block.attn.out_proj((attention @ v).transpose(0, 1).reshape(65, 128)))
        torch.testing.assert_close(clearclip_block(block, x), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown dense mode 'best'"):
        encode_image_dense(tiny_model.clip.visual, torch.zeros(1, 3, 64, 64), "best")
