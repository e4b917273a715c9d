"""Tiny text encoders and tokenizers built here, with no download, for the tiny random checkpoints that tests and
offline smoke runs of the photo families use (diffusers' own test configurations)."""

from __future__ import annotations


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIP tokenizer over single characters, built here (no download): every prompt tokenizes."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-_.,!'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip_config(vocab_size: int, max_length: int = 16, **kw):
    """diffusers' test CLIP text configuration (32 wide), for the tiny tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
                          max_position_embeddings=max_length, **kw)


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5 (Unigram) tokenizer over single characters, built here (no download)."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + "-_.,!'"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_flow_vae(image_size: int):
    """The tiny VAE of the flow families (SD 3.x, FLUX.1): 4 latent channels, no quant convs, their shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4, sample_size=image_size, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)
