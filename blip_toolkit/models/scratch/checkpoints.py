"""Checkpoints of every family the toolkit supports, built with the real transformers classes and
random weights, with processors whose tokenizers are built locally. They are written with
`save_pretrained` and load through the same `from_pretrained` path as a download.

    from blip_toolkit.models.scratch.checkpoints import ModelSize, build_checkpoint
    build_checkpoint("blip-caption", "models/cap-init", size=ModelSize(hidden=128), corpus=[...])

`ModelSize` sets the widths: the demo's small models and the tests' tiny ones come from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from blip_toolkit.log import quiet_transformers
from blip_toolkit.models.scratch import tokenizers as toks

KINDS = (
    "blip-caption",
    "blip-vqa",
    "blip-itm",
    "blip2-opt",
    "blip2-t5",
    "blip2-itm",
    "clip",
    "instructblip-t5",
    "instructblip-vicuna",
)
# Words of InstructBLIP's instructions (the default captioning instruction, the VQA template), so the
# instruction tokenizers spell them in whole words.
INSTRUCTION_CORPUS = ["A short image caption.", "Question: what is it? Short Answer:"]


@dataclass(frozen=True)
class ModelSize:
    """Widths of a from-scratch model. The defaults make a checkpoint of a few hundred kB."""

    image_size: int = 32
    patch_size: int = 8
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    text_hidden: int | None = None  # defaults to `hidden`
    text_layers: int | None = None
    projection: int = 16
    num_query_tokens: int = 4
    max_text_positions: int = 64
    # BLIP-2 / InstructBLIP: the Q-Former's width and depth (default: the text width and depth) and
    # the language model's feed-forward width (default: `intermediate`), so a large language model
    # can sit behind a small Q-Former, as in the real checkpoints.
    qformer_hidden: int | None = None
    qformer_layers: int | None = None
    lm_intermediate: int | None = None
    # BLIP's vision config defaults to initializer_range=1e-10, which leaves a from-scratch vision
    # tower at ~zero output and unable to learn; use a normal ViT initialisation instead.
    initializer_range: float = 0.02

    @property
    def text_width(self) -> int:
        return self.text_hidden or self.hidden

    @property
    def text_depth(self) -> int:
        return self.text_layers or self.layers

    @property
    def lm_ffn(self) -> int:
        return self.lm_intermediate or self.intermediate


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _blip_image_processor(size: ModelSize):
    return BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size})


def _blip_vision(size: ModelSize) -> dict:
    return dict(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        initializer_range=size.initializer_range,
    )


def _bert_text(size: ModelSize, tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.text_depth,
        num_attention_heads=size.heads,
        max_position_embeddings=size.max_text_positions,
        encoder_hidden_size=size.hidden,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        initializer_range=size.initializer_range,
        **extra,
    )


def build_blip(
    kind: str,
    out_dir: str | Path,
    *,
    size: ModelSize | None = None,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """BLIP captioning (`blip-caption`), VQA (`blip-vqa`) or image-text matching (`blip-itm`)."""
    size = size or ModelSize()
    tokenizer = toks.wordpiece_tokenizer(corpus, blip_decoder=True)
    config = BlipConfig(
        text_config=_bert_text(size, tokenizer, bos_token_id=tokenizer.bos_token_id),
        vision_config=_blip_vision(size),
        projection_dim=size.projection,
        image_text_hidden_size=size.projection,
        initializer_range=size.initializer_range,
    )
    model_class = {
        "blip-caption": BlipForConditionalGeneration,
        "blip-vqa": BlipForQuestionAnswering,
        "blip-itm": BlipForImageTextRetrieval,
    }[kind]
    _seed(seed)
    model = model_class(config)
    processor = BlipProcessor(image_processor=_blip_image_processor(size), tokenizer=tokenizer)
    return _save(model, processor, out_dir)


def build_blip2(
    kind: str,
    out_dir: str | Path,
    *,
    size: ModelSize | None = None,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """BLIP-2 with an OPT (`blip2-opt`) or Flan-T5 (`blip2-t5`) language model, or the BLIP-2
    image-text retrieval model (`blip2-itm`, a Q-Former with text input)."""
    size = size or ModelSize()
    vision = dict(_blip_vision(size))
    if kind == "blip2-itm":
        tokenizer = toks.wordpiece_tokenizer(corpus, blip_decoder=False)
    elif kind == "blip2-opt":
        tokenizer = toks.opt_tokenizer(corpus)
    elif kind == "blip2-t5":
        tokenizer = toks.t5_tokenizer(corpus)
    else:
        raise ValueError(f"unknown BLIP-2 kind {kind!r}")
    # The processor adds the <image> token; the config must know its id (real checkpoints do the same).
    processor = Blip2Processor(
        image_processor=_blip_image_processor(size),
        tokenizer=tokenizer,
        num_query_tokens=size.num_query_tokens,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    qformer = dict(
        hidden_size=size.qformer_hidden or size.text_width,
        num_hidden_layers=size.qformer_layers or size.text_depth,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        encoder_hidden_size=size.hidden,
        cross_attention_frequency=1,
        max_position_embeddings=size.max_text_positions,
        initializer_range=size.initializer_range,
    )
    if kind == "blip2-itm":
        qformer.update(
            vocab_size=len(tokenizer), use_qformer_text_input=True, pad_token_id=tokenizer.pad_token_id
        )
        text_config = OPTConfig(
            vocab_size=8,
            hidden_size=8,
            num_hidden_layers=1,
            ffn_dim=8,
            num_attention_heads=1,
            word_embed_proj_dim=8,
        )  # unused by the retrieval model, but the config needs one
    elif kind == "blip2-opt":
        text_config = _opt_config(size, tokenizer)
    else:
        text_config = _t5_config(size, tokenizer)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text_config.to_dict(),
        num_query_tokens=size.num_query_tokens,
        image_token_index=image_token_id,
        image_text_hidden_size=size.projection,
        initializer_range=size.initializer_range,
    )
    model_class = Blip2ForImageTextRetrieval if kind == "blip2-itm" else Blip2ForConditionalGeneration
    _seed(seed)
    model = model_class(config)
    return _save(model, processor, out_dir)


def _opt_config(size: ModelSize, tokenizer) -> OPTConfig:
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        num_hidden_layers=size.text_depth,
        ffn_dim=size.lm_ffn,
        num_attention_heads=size.heads,
        max_position_embeddings=128,
        word_embed_proj_dim=size.text_width,
        bos_token_id=tokenizer.bos_token_id,
        init_std=size.initializer_range,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(size: ModelSize, tokenizer) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=size.text_width,
        d_kv=max(size.text_width // size.heads, 4),
        d_ff=size.lm_ffn,
        num_layers=size.text_depth,
        num_decoder_layers=size.text_depth,
        num_heads=size.heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        initializer_factor=size.initializer_range / 0.02,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _llama_config(size: ModelSize, tokenizer) -> LlamaConfig:
    """A LLaMA (Vicuna) language model: RMSNorm, rotary positions, SwiGLU, untied output layer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=size.lm_ffn,
        num_hidden_layers=size.text_depth,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=256,
        initializer_range=size.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_instructblip(
    kind: str,
    out_dir: str | Path,
    *,
    size: ModelSize | None = None,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """InstructBLIP with a Flan-T5 (`instructblip-t5`) or Vicuna / LLaMA (`instructblip-vicuna`)
    language model: BLIP-2's layout plus an instruction-aware Q-Former, whose own BERT tokenizer
    (`qformer_tokenizer`, with `[DEC]`) the processor carries beside the language model's."""
    size = size or ModelSize()
    words = (corpus or toks.DEFAULT_CORPUS) + INSTRUCTION_CORPUS
    if kind == "instructblip-t5":
        # Flan-T5's tokenizer as InstructBLIP uses it: truncation from the left.
        tokenizer = toks.t5_tokenizer(words, truncation_side="left")
    elif kind == "instructblip-vicuna":
        tokenizer = toks.vicuna_tokenizer(words)
    else:
        raise ValueError(f"unknown InstructBLIP kind {kind!r}")
    qformer_tokenizer = toks.qformer_tokenizer(words)
    processor = InstructBlipProcessor(
        image_processor=_blip_image_processor(size),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=size.num_query_tokens,
    )
    text_config = _t5_config(size, tokenizer) if kind == "instructblip-t5" else _llama_config(size, tokenizer)
    config = InstructBlipConfig(
        vision_config=_blip_vision(size),
        qformer_config=dict(
            vocab_size=len(qformer_tokenizer),
            hidden_size=size.qformer_hidden or size.text_width,
            num_hidden_layers=size.qformer_layers or size.text_depth,
            num_attention_heads=size.heads,
            intermediate_size=size.intermediate,
            encoder_hidden_size=size.hidden,
            cross_attention_frequency=1,
            max_position_embeddings=size.max_text_positions,
            pad_token_id=qformer_tokenizer.pad_token_id,
            initializer_range=size.initializer_range,
        ),
        text_config=text_config.to_dict(),
        num_query_tokens=size.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=size.initializer_range,
    )
    _seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    return _save(model, processor, out_dir)


def build_clip(
    out_dir: str | Path, *, size: ModelSize | None = None, corpus: list[str] | None = None, seed: int = 0
) -> Path:
    """A CLIP model (vision + text towers, projections)."""
    size = size or ModelSize()
    tokenizer = toks.clip_tokenizer(corpus)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.text_width,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.text_depth,
            num_attention_heads=size.heads,
            max_position_embeddings=size.max_text_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            image_size=size.image_size,
            patch_size=size.patch_size,
        ),
        projection_dim=size.projection,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    _seed(seed)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(model, processor, out_dir)


def build_checkpoint(
    kind: str,
    out_dir: str | Path,
    *,
    size: ModelSize | None = None,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build one checkpoint of `kind` (one of KINDS) into `out_dir`."""
    if kind.startswith("blip2-"):
        return build_blip2(kind, out_dir, size=size, corpus=corpus, seed=seed)
    if kind.startswith("instructblip-"):
        return build_instructblip(kind, out_dir, size=size, corpus=corpus, seed=seed)
    if kind.startswith("blip-"):
        return build_blip(kind, out_dir, size=size, corpus=corpus, seed=seed)
    if kind == "clip":
        return build_clip(out_dir, size=size, corpus=corpus, seed=seed)
    raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")


def _save(model, processor, out_dir: str | Path) -> Path:
    quiet_transformers()  # save_pretrained draws a "Writing model shards" bar on stderr otherwise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
