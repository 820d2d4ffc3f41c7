"""Matmul FLOPs of BLIP's captioning, VQA and ITM passes, counted from the model's shapes (the
"roofline" references of bench_caption.py and bench_tasks.py: FLOPs per image / this machine's
measured matmul rate = the least time the work can take on this CPU).

Only matrix products are counted (linear layers, the patch-embedding convolution, attention's two
products), which is what torch's FlopCounterMode counts; layer norms, softmax and activations are
memory-bound and not part of a matmul roofline. tests/bench/test_flops.py checks every formula
against FlopCounterMode on real (tiny) models.
"""

from __future__ import annotations


def vision_flops(vision) -> int:
    """One image through BLIP's ViT (`BlipVisionConfig`): patch embedding + every layer."""
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = patches + 1  # + [CLS]
    width, ffn = vision.hidden_size, vision.intermediate_size
    embed = 2 * patches * (3 * vision.patch_size**2) * width  # RGB patches
    per_layer = (
        2 * tokens * width * 3 * width  # qkv
        + 2 * tokens * width * width  # output projection
        + 2 * 2 * tokens * width * ffn  # MLP
        + 2 * 2 * tokens * tokens * width  # scores and weighted sum
    )
    return embed + vision.num_hidden_layers * per_layer


def text_layer_flops(text, positions: int, keys: int, image_tokens: int, *, cross_kv: bool) -> int:
    """One layer of BLIP's text transformer (`BlipTextConfig`) on `positions` new tokens whose
    self-attention sees `keys` tokens in all (cache included), cross-attending to `image_tokens`;
    `cross_kv`: the image keys / values are projected in this pass (not taken from the cache)."""
    width, ffn, enc = text.hidden_size, text.intermediate_size, text.encoder_hidden_size
    flops = 2 * positions * width * 4 * width  # self q, k, v, o
    flops += 2 * 2 * positions * keys * width  # self scores and weighted sum
    flops += 2 * positions * width * 2 * width  # cross q, o
    flops += 2 * 2 * positions * image_tokens * width  # cross scores and weighted sum
    if cross_kv:
        flops += 2 * image_tokens * enc * 2 * width  # cross k, v of the image tokens
    return flops + 2 * 2 * positions * width * ffn


def lm_head_flops(text, positions: int) -> int:
    """The prediction head (dense transform + vocabulary projection) on `positions` tokens."""
    return 2 * positions * text.hidden_size * (text.hidden_size + text.vocab_size)


def image_tokens(vision) -> int:
    return (vision.image_size // vision.patch_size) ** 2 + 1


def decode_flops(text, image_count: int, prompt: int, steps: int) -> int:
    """Greedy decoding of `steps` new tokens after a `prompt` of that many tokens (BLIP's caption
    decoder starts from [DEC]: prompt 1), one image: the first pass reads the whole prompt (and
    projects the image keys / values), each later pass one token; the head runs on the last
    position of each pass (transformers' generate keeps only those logits)."""
    flops = 0
    for step in range(steps):
        positions = prompt if step == 0 else 1
        keys = prompt + step
        flops += text.num_hidden_layers * text_layer_flops(
            text, positions, keys, image_count, cross_kv=step == 0
        )
        flops += lm_head_flops(text, 1)
    return flops


def caption_flops(config, steps: int, prompt: int = 1) -> dict[str, int]:
    """{"vision", "decode", "total"} FLOPs of one image's caption of `steps` new tokens with
    `BlipForConditionalGeneration` (`config`: its BlipConfig)."""
    vision = vision_flops(config.vision_config)
    decode = decode_flops(config.text_config, image_tokens(config.vision_config), prompt, steps)
    return {"vision": vision, "decode": decode, "total": vision + decode}


def text_encoder_flops(text, tokens: int, image_count: int | None) -> int:
    """BLIP's text encoder over `tokens` tokens (bidirectional), cross-attending to `image_count`
    image tokens (None: the unimodal text encoder, no cross-attention)."""
    width, ffn = text.hidden_size, text.intermediate_size
    per_layer = (
        2 * tokens * width * 4 * width + 2 * 2 * tokens * tokens * width + 2 * 2 * tokens * width * ffn
    )
    if image_count is not None:
        per_layer += 2 * tokens * width * 2 * width + 2 * 2 * tokens * image_count * width
        per_layer += 2 * image_count * text.encoder_hidden_size * 2 * width
    return text.num_hidden_layers * per_layer


def vqa_flops(config, question_tokens: int, steps: int) -> dict[str, int]:
    """One (image, question) through `BlipForQuestionAnswering.generate`: the vision tower, the
    question encoder cross-attending to the image, and the answer decoder (starting from its bos)
    cross-attending to the question's `question_tokens` states."""
    vision = vision_flops(config.vision_config)
    count = image_tokens(config.vision_config)
    question = text_encoder_flops(config.text_config, question_tokens, count)
    decode = decode_flops(config.text_config, question_tokens, 1, steps)
    return {"vision": vision, "question": question, "decode": decode, "total": vision + question + decode}


def itc_image_flops(config) -> int:
    """One image's ITC embedding with `BlipForImageTextRetrieval`: the vision tower and vision_proj."""
    return (
        vision_flops(config.vision_config)
        + 2 * config.vision_config.hidden_size * config.image_text_hidden_size
    )


def itc_text_flops(config, tokens: int) -> int:
    """One text's ITC embedding: the unimodal text encoder over `tokens` tokens and text_proj."""
    text = config.text_config
    return text_encoder_flops(text, tokens, None) + 2 * text.hidden_size * config.image_text_hidden_size


def itm_pair_flops(config, tokens: int) -> int:
    """One (image, text) ITM score: the text encoder over `tokens` tokens cross-attending to the
    image tokens, and the ITM head on its first token."""
    count = image_tokens(config.vision_config)
    return text_encoder_flops(config.text_config, tokens, count) + 2 * config.text_config.hidden_size * 2


def retrieval_flops(config, images: int, texts: int, tokens: int, pairs: int) -> int:
    """Ranking `texts` texts of `tokens` tokens for each of `images` images, ITM on `pairs` (image,
    text) pairs in all: image and text embeddings once each, the similarity matrix, the ITM pairs."""
    return (
        images * itc_image_flops(config)
        + texts * itc_text_flops(config, tokens)
        + 2 * images * texts * config.image_text_hidden_size
        + pairs * itm_pair_flops(config, tokens)
    )
