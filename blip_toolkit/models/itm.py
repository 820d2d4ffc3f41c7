"""The one ITM / ITC scorer of BLIP and BLIP-2 retrieval checkpoints, used piecewise by
`blip retrieval` (predictors/retrieval.py), retrieval fine-tuning (its loss and validation recall),
`blip eval retrieval` and the BLIP ITM encoder adapter of extract-embeddings: what is trained is
what is scored.

- BLIP (`BlipForImageTextRetrieval`): ITC is the cosine of the projected [CLS] embeddings of the
  vision tower and of the unimodal text encoder; ITM is the head on the first token of the text
  encoder cross-attending to the image. That first token is `[ENC]`, not the tokenizer's `[CLS]`:
  BLIP's ITM head was trained and is evaluated that way (LAVIS `blip_retrieval.py` and
  `compute_sim_matrix`: `text_ids[:, 0] = tokenizer.enc_token_id`), while transformers' forward feeds
  whatever ids it is given. `itm_input_ids` makes that substitution for every caller.
- BLIP-2 (`Blip2ForImageTextRetrieval`): ITC is the max over the query embeddings of the cosine
  with the text [CLS] (LAVIS `blip2_qformer.py`); ITM runs the Q-Former on queries + text and
  averages the head over the query outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENC_TOKEN = "[ENC]"


def itm_input_ids(family_name: str, tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """The text ids the ITM head reads: BLIP's start with `[ENC]` (when the tokenizer has it, as the
    Salesforce/blip-* tokenizers do) instead of `[CLS]`; BLIP-2's are the ids as tokenized."""
    enc = tokenizer.get_vocab().get(ENC_TOKEN) if family_name == "blip-itm" else None
    if enc is None:
        return input_ids
    ids = input_ids.clone()
    ids[:, 0] = enc
    return ids


def _ones_mask(states: torch.Tensor) -> torch.Tensor:
    return torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)


class BlipItmOps:
    """BlipForImageTextRetrieval."""

    @staticmethod
    def image(model, pixel_values):
        """-> (image_embeds [B, P, D] for ITM, image_feat [B, E] normalised for ITC)."""
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        return image_embeds, F.normalize(BlipItmOps.project_image(model, image_embeds), dim=-1)

    @staticmethod
    def project_image(model, image_embeds):
        """The unnormalised image embedding [B, E]: vision_proj of the (post-layernorm) [CLS]."""
        return model.vision_proj(image_embeds[:, 0, :])

    @staticmethod
    def text_embeds(model, input_ids, attention_mask):
        """The unnormalised text embedding [B, E]: text_proj of the unimodal text encoder's [CLS]."""
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.text_proj(hidden[:, 0, :])

    @staticmethod
    def text(model, input_ids, attention_mask):
        """-> text_feat [B, E] normalised."""
        return F.normalize(BlipItmOps.text_embeds(model, input_ids, attention_mask), dim=-1)

    @staticmethod
    def similarity(image_feat, text_feat):
        """[I, E] x [T, E] -> [I, T] cosine similarities."""
        return image_feat @ text_feat.t()

    @staticmethod
    def itm(model, image_embeds, input_ids, attention_mask):
        """Paired inputs (row i with row i; input_ids from `itm_input_ids`) -> ITM logits [N, 2]
        (index 1 = "match")."""
        hidden = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_ones_mask(image_embeds),
        ).last_hidden_state
        return model.itm_head(hidden[:, 0, :])

    @staticmethod
    def itm_grouped(model, image_embeds, input_ids, attention_mask):
        """ITM logits [G * k, 2] of `k` texts per image: image_embeds [G, P, D] (each image once),
        input_ids / attention_mask [G * k, L] with image g's texts at rows g * k ... g * k + k - 1.
        Equal to `itm` on the expanded pairs; each image's keys and values are projected once, which
        needs the fused text attention (models/fast_attention.py; `text_attention_is_fused`)."""
        hidden = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,  # every image token is attended (what _ones_mask gives)
        ).last_hidden_state
        return model.itm_head(hidden[:, 0, :])


class Blip2ItmOps:
    """Blip2ForImageTextRetrieval."""

    @staticmethod
    def image(model, pixel_values):
        """-> (image_embeds [B, P, D] for ITM, image_feat [B, Q, E] normalised for ITC)."""
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_ones_mask(image_embeds),
        ).last_hidden_state
        feat = model.vision_projection(query_out.to(model.vision_projection.weight.dtype))
        return image_embeds, F.normalize(feat, dim=-1)

    @staticmethod
    def text(model, input_ids, attention_mask):
        """-> text_feat [B, E] normalised (the Q-Former's text-only [CLS])."""
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(
            model.text_projection(hidden[:, 0, :].to(model.text_projection.weight.dtype)), dim=-1
        )

    @staticmethod
    def similarity(image_feat, text_feat):
        """[I, Q, E] x [T, E] -> [I, T]: the best query per pair (BLIP-2 ITC)."""
        return torch.einsum("iqe,te->itq", image_feat, text_feat).amax(dim=-1)

    @staticmethod
    def itm(model, image_embeds, input_ids, attention_mask):
        """Paired inputs -> ITM logits [N, 2]."""
        num_queries = model.query_tokens.shape[1]
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_ones_mask(image_embeds),
        ).last_hidden_state
        return model.itm_head(hidden[:, :num_queries, :].to(model.itm_head.weight.dtype)).mean(dim=1)


ITM_OPS = {"blip-itm": BlipItmOps, "blip2-itm": Blip2ItmOps}
