"""The LAVIS retrieval protocol (ITC shortlist + ITM re-rank), against references written here:

- LAVIS's `itm_eval` (argsort ranks over the dense score matrices filled with -100) ported below,
  fed with the dense matrices LAVIS's `compute_sim_matrix` would build;
- brute-force ITM + ITC on all pairs computed with the transformers models' own forward
  (`BlipForImageTextRetrieval(..., use_itm_head=...)`, `Blip2ForImageTextRetrieval(...,
  use_image_text_matching_head=...)`) on tiny real checkpoints;
- `metrics/recall.py`'s `retrieval_recall` for ITC alone.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from blip_toolkit.jobs.eval_itm_features import ItmModel, pre_caption
from blip_toolkit.jobs.eval_retrieval import evaluate_retrieval
from blip_toolkit.jobs.evaluate import RetrievalEvalConfig
from blip_toolkit.metrics.recall import retrieval_recall
from blip_toolkit.metrics.retrieval_protocol import (
    FILL,
    check_text_image,
    itc_ranks,
    lavis_metrics,
    recall_from_ranks,
    run_protocol,
    shortlist_ranks,
)
from blip_toolkit.models.loading import load_model

# Lower-case, no punctuation: LAVIS's pre_caption leaves them as they are, so the brute force can
# tokenize them directly. Words from the tiny tokenizers' corpus.
CAPTIONS = {
    "astronaut": ["a man riding a bike down a street", "a photo of a man"],
    "brick": ["a red car parked next to a tree", "a red wall"],
    "camera": ["a child is flying a kite in a park", "a photo of a child"],
    "cat": ["a photo of a cat", "two cats laying on a couch"],
    "coffee": ["a bowl of fruit on a table", "a cup on a table"],
    "coins": ["what digit is this", "a pile of coins on a table"],
    "grass": ["a photo of a dog", "a dog in a park"],
    "rocket": ["what is in the picture", "a red rocket"],
}


def lavis_itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict:
    """LAVIS lavis/tasks/retrieval.py RetrievalTask._report_metrics (itm_eval), as published."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    return {
        "txt_r1": tr[0],
        "txt_r5": tr[1],
        "txt_r10": tr[2],
        "txt_r_mean": tr_mean,
        "img_r1": ir[0],
        "img_r5": ir[1],
        "img_r10": ir[2],
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
        "agg_metrics": tr_mean,
    }


def lavis_dense(itc: torch.Tensor, itm: torch.Tensor, k_test: int):
    """The score matrices of LAVIS's compute_sim_matrix from a dense ITC [I, T] and ITM logit [I, T]."""
    num_images, num_texts = itc.shape
    i2t = torch.full((num_images, num_texts), FILL)
    for i in range(num_images):
        top = itc[i].topk(k_test)
        i2t[i, top.indices] = itm[i, top.indices] + top.values
    t2i = torch.full((num_texts, num_images), FILL)
    for t in range(num_texts):
        top = itc[:, t].topk(k_test)
        t2i[t, top.indices] = itm[top.indices, t] + top.values
    return i2t, t2i


def pessimistic_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """1 + number of negatives scoring >= the best positive, per row of a dense matrix."""
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
    return 1 + ((scores >= best[:, None]) & ~positive).sum(dim=1)


# ----------------------------------------------------------------------------- pure protocol


def test_shortlist_ranks_equal_dense_ranks_with_fill():
    gen = torch.Generator().manual_seed(0)
    num_rows, num_candidates = 30, 25
    for k in (1, 3, 10, 25):
        scores = torch.randn(num_rows, num_candidates, generator=gen)
        positive_dense = torch.rand(num_rows, num_candidates, generator=gen) < 0.12
        positive_dense[torch.arange(num_rows), torch.randint(num_candidates, (num_rows,), generator=gen)] = (
            True
        )
        index = torch.stack([torch.randperm(num_candidates, generator=gen)[:k] for _ in range(num_rows)])
        final = scores.gather(1, index)
        dense = torch.full((num_rows, num_candidates), FILL)
        dense.scatter_(1, index, final)
        expected = pessimistic_ranks(dense, positive_dense)
        got = shortlist_ranks(
            final, positive_dense.gather(1, index), positive_dense.sum(dim=1), num_candidates
        )
        assert torch.equal(got, expected), k


def test_protocol_matches_lavis_on_dense_matrices():
    # Random features and a random ITM table: the blocked, deduplicated protocol against LAVIS's dense
    # computation. k_test = 12 >= 10, so positives outside the shortlist miss R@10 in both (LAVIS
    # orders the -100 ties arbitrarily, we pessimistically).
    gen = torch.Generator().manual_seed(1)
    num_images, per_image, dim, k_test = 15, 3, 8, 12
    num_texts = num_images * per_image
    image_feat = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=-1)
    text_image = torch.arange(num_images).repeat_interleave(per_image)
    text_feat = torch.nn.functional.normalize(
        image_feat[text_image] + 0.9 * torch.randn(num_texts, dim, generator=gen), dim=-1
    )
    itm_table = torch.randn(num_images, num_texts, generator=gen)
    calls = []

    def itm(image_index, text_index):
        calls.append(len(image_index))
        assert torch.all(image_index[1:] >= image_index[:-1])  # sorted by image
        return itm_table[image_index, text_index]

    result = run_protocol(
        image_feat, text_feat, text_image, lambda a, b: a @ b.t(), itm, k_test=k_test, max_memory_bytes=700
    )
    i2t, t2i = lavis_dense(image_feat @ text_feat.t(), itm_table, k_test)
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)]
    expected = lavis_itm_eval(i2t.numpy(), t2i.numpy(), text_image.tolist(), img2txt)
    assert lavis_metrics(result.recall) == pytest.approx(expected, abs=1e-9)
    # Every distinct shortlisted pair once: no more than LAVIS's (I + T) * k passes.
    assert sum(calls) == result.itm_pairs <= (num_images + num_texts) * k_test
    assert result.shortlist_entries == (num_images + num_texts) * k_test


def test_itc_ranks_equal_recall_module_and_dense_ranks():
    gen = torch.Generator().manual_seed(2)
    num_images, per_image, dim = 12, 4, 16
    text_image = torch.arange(num_images).repeat_interleave(per_image)
    image_feat = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=-1)
    text_feat = torch.nn.functional.normalize(
        image_feat[text_image] + 1.2 * torch.randn(len(text_image), dim, generator=gen), dim=-1
    )
    image_texts = check_text_image(text_image, num_images)
    ranks_i2t, ranks_t2i = itc_ranks(
        image_feat, text_feat, lambda a, b: a @ b.t(), image_texts, text_image[:, None], max_memory_bytes=300
    )
    sims = image_feat @ text_feat.t()
    positive = text_image[None, :] == torch.arange(num_images)[:, None]
    assert torch.equal(ranks_i2t, pessimistic_ranks(sims, positive))
    assert torch.equal(ranks_t2i, pessimistic_ranks(sims.t(), positive.t()))
    reference = retrieval_recall(image_feat, text_feat, text_image, torch.arange(len(text_image)))
    ours = recall_from_ranks(ranks_i2t, ranks_t2i)
    assert ours.i2t == reference.i2t and ours.t2i == reference.t2i


def test_many_to_many_positives_equal_a_dense_computation():
    """Identical captions merged into one text, positive for several images: with k_test >= every
    candidate, the re-ranked ranks equal dense ranks of ITM + ITC with a many-to-many positive mask,
    and ITC alone equals metrics/recall.py on the same pairs."""
    gen = torch.Generator().manual_seed(5)
    num_images, num_texts, dim = 9, 4, 8
    pair_image = torch.arange(num_images)
    pair_text = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])  # text t is the caption of images t, t+4, (t+8)
    image_feat = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(num_texts, dim, generator=gen), dim=-1)
    itm_table = torch.randn(num_images, num_texts, generator=gen)
    sims = image_feat @ text_feat.t()
    positive = torch.zeros(num_images, num_texts, dtype=torch.bool)
    positive[pair_image, pair_text] = True
    result = run_protocol(
        image_feat,
        text_feat,
        None,
        lambda a, b: a @ b.t(),
        lambda i, t: itm_table[i, t],
        k_test=num_images,
        positives=(pair_image, pair_text),
    )
    final = sims + itm_table
    assert torch.equal(result.recall.ranks_i2t, pessimistic_ranks(final, positive))
    assert torch.equal(result.recall.ranks_t2i, pessimistic_ranks(final.t(), positive.t()))
    itc_only = run_protocol(
        image_feat,
        text_feat,
        None,
        lambda a, b: a @ b.t(),
        None,
        score="itc",
        positives=(pair_image, pair_text),
    )
    reference = retrieval_recall(image_feat, text_feat, pair_image, pair_text, (1, 5, 10))
    assert itc_only.recall.i2t == reference.i2t and itc_only.recall.t2i == reference.t2i


def test_pre_caption_follows_lavis():
    # LAVIS BlipCaptionProcessor.pre_caption: lower-case, each of .!"()*#:;~ -> space, runs of
    # whitespace -> one space, stripped, at most 50 words.
    assert pre_caption('A Dog (brown) runs: "fast"!') == "a dog brown runs fast"
    assert pre_caption("it's a cat, isn't it?") == "it's a cat, isn't it?"
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


# ----------------------------------------------------------------------------- tiny real models


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("retrieval")
    images = root / "images"
    images.mkdir()
    for path in sample_images:
        shutil.copy(path, images / path.name)
    entries = [{"image": f"{name}.jpg", "caption": caps} for name, caps in CAPTIONS.items()]
    annotations = root / "coco_test.json"
    annotations.write_text(json.dumps(entries))
    return annotations, images


def brute_force(loaded, image_paths, texts, text_image):
    """ITC [I, T] and ITM match logits [I, T] for ALL pairs with the transformers model's forward."""
    from blip_toolkit.data.images import open_image

    model, processor = loaded.model, loaded.processor
    pixels = processor(images=[open_image(p) for p in image_paths], return_tensors="pt")["pixel_values"]
    num_images, num_texts = len(image_paths), len(texts)
    itm = torch.empty(num_images, num_texts)
    with torch.no_grad():
        if loaded.family.is_blip2:
            # The processor puts the query placeholders in front; the forward strips them again.
            enc = processor(
                images=[open_image(image_paths[0])] * num_texts, text=texts, padding=True, return_tensors="pt"
            )
            itc = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=pixels,
                use_image_text_matching_head=False,
            ).logits_per_image  # [I, T]
            for i in range(num_images):
                out = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=pixels[i : i + 1].expand(num_texts, -1, -1, -1),
                    use_image_text_matching_head=True,
                ).logits_per_image  # [T, 2]
                itm[i] = out[:, 1]
        else:
            enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
            itc = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=pixels,
                use_itm_head=False,
            ).itm_score  # [I, T] cosine similarities
            # LAVIS's retrieval evaluation feeds ITM with [ENC] as the first token.
            itm_ids = enc["input_ids"].clone()
            itm_ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
            for i in range(num_images):
                out = model(
                    input_ids=itm_ids,
                    attention_mask=enc["attention_mask"],
                    pixel_values=pixels[i : i + 1].expand(num_texts, -1, -1, -1),
                    use_itm_head=True,
                ).itm_score  # [T, 2]
                itm[i] = out[:, 1]
    return itc.float(), itm


@pytest.fixture(scope="module")
def strong_itm(tiny_models, tmp_path_factory):
    """{kind: checkpoint} of the tiny ITM checkpoints with the ITM head scaled up 300x, so that ITM,
    not ITC, decides the ranks (an untrained head's logits barely vary) and a wrong ITM input or
    output would change the result."""
    from transformers import AutoProcessor

    from blip_toolkit.models.loading import FAMILIES

    out = {}
    for kind in ("blip-itm", "blip2-itm"):
        model = FAMILIES[kind].model_class().from_pretrained(tiny_models[kind])
        with torch.no_grad():
            model.itm_head.weight.mul_(300.0)
            model.itm_head.bias.mul_(300.0)
        path = tmp_path_factory.mktemp(f"strong-{kind}")
        model.save_pretrained(path)
        AutoProcessor.from_pretrained(tiny_models[kind]).save_pretrained(path)
        out[kind] = path
    return out


NAMES = list(CAPTIONS)
TEXTS = [c for name in NAMES for c in CAPTIONS[name]]
TEXT_IMAGE = torch.tensor([i for i, name in enumerate(NAMES) for _ in CAPTIONS[name]])


@pytest.fixture(scope="module")
def brute(strong_itm, dataset):
    """kind -> (loaded model, brute-force ITC [I, T], ITM [I, T]), computed once per kind."""
    _, images = dataset
    cache = {}

    def get(kind):
        if kind not in cache:
            loaded = load_model(str(strong_itm[kind]), "retrieval")
            cache[kind] = (
                loaded,
                *brute_force(loaded, [images / f"{n}.jpg" for n in NAMES], TEXTS, TEXT_IMAGE),
            )
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm"])
def test_full_k_test_equals_brute_force_itm_plus_itc(kind, strong_itm, dataset, brute):
    annotations, images = dataset
    report = evaluate_retrieval(
        RetrievalEvalConfig(
            annotations=str(annotations),
            images=str(images),
            model=str(strong_itm[kind]),
            k_test=1000,
            device="cpu",
        )
    )
    _, itc, itm = brute(kind)
    assert itm.std() > 3 * itc.std()  # ITM decides: the check below is sensitive to it
    final = itc + itm  # every pair re-ranked: k_test >= the number of candidates
    img2txt = [(TEXT_IMAGE == i).nonzero().flatten().tolist() for i in range(len(NAMES))]
    expected = lavis_itm_eval(final.numpy(), final.t().numpy(), TEXT_IMAGE.tolist(), img2txt)
    assert report["metrics"] == pytest.approx(expected, abs=1e-9)
    positive = TEXT_IMAGE[None, :] == torch.arange(len(NAMES))[:, None]
    assert report["recall"]["mean_rank_i2t"] == pytest.approx(
        float(pessimistic_ranks(final, positive).double().mean())
    )
    assert report["recall"]["mean_rank_t2i"] == pytest.approx(
        float(pessimistic_ranks(final.t(), positive.t()).double().mean())
    )
    protocol = report["protocol"]
    assert (protocol["k_i2t"], protocol["k_t2i"]) == (len(TEXTS), len(NAMES))
    assert protocol["itm_pairs"] == len(NAMES) * len(TEXTS)  # every pair once, not twice
    assert protocol["itm_first_token"] == ("as tokenized" if kind == "blip2-itm" else "[ENC]")


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm"])
def test_itc_and_itm_values_equal_the_model_forward(kind, dataset, brute):
    _, images = dataset
    loaded, itc, itm = brute(kind)
    scorer = ItmModel(loaded, batch_size=3, itm_batch_size=7)
    scorer.encode_texts(TEXTS)
    scorer.encode_images([str(images / f"{n}.jpg") for n in NAMES])
    torch.testing.assert_close(
        scorer.similarity(scorer.image_feat, scorer.text_feat), itc, rtol=1e-4, atol=1e-5
    )
    pairs_i = torch.arange(len(NAMES)).repeat_interleave(len(TEXTS))
    pairs_t = torch.arange(len(TEXTS)).repeat(len(NAMES))
    ours = scorer.itm_scores(pairs_i, pairs_t).view(len(NAMES), len(TEXTS))
    torch.testing.assert_close(ours, itm, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def blip_scorer(tiny_models, dataset):
    """A BLIP ITM scorer with the sample images and captions encoded, and its ITM head call counter."""
    _, images = dataset
    loaded = load_model(str(tiny_models["blip-itm"]), "retrieval")
    scorer = ItmModel(loaded, batch_size=3, itm_batch_size=5)
    scorer.encode_texts(TEXTS)
    scorer.encode_images([str(images / f"{n}.jpg") for n in NAMES])
    rows: list[int] = []
    loaded.model.itm_head.register_forward_hook(
        lambda module, inputs, output: rows.append(inputs[0].shape[0])
    )
    return scorer, TEXT_IMAGE, rows


def test_itm_forward_passes_scale_with_k_test_not_pairs(blip_scorer):
    scorer, text_image, rows = blip_scorer
    num_images, num_texts = scorer.image_feat.shape[0], scorer.text_feat.shape[0]
    counted = {}
    for k in (1, 2, 4):
        rows.clear()
        result = run_protocol(
            scorer.image_feat, scorer.text_feat, text_image, scorer.similarity, scorer.itm_scores, k_test=k
        )
        counted[k] = sum(rows)  # pairs that actually went through the ITM head
        assert counted[k] == result.itm_pairs
        assert max(num_images, num_texts) * k <= counted[k] <= (num_images + num_texts) * k
    assert counted[1] < counted[2] < counted[4] < num_images * num_texts


def test_recomputed_patch_embeddings_give_the_same_scores(tiny_models, dataset, blip_scorer):
    scorer, text_image, _ = blip_scorer
    cached = run_protocol(
        scorer.image_feat, scorer.text_feat, text_image, scorer.similarity, scorer.itm_scores, k_test=3
    )
    _, images = dataset
    uncached = ItmModel(scorer.loaded, batch_size=3, itm_batch_size=5, cache_bytes=1)  # nothing fits
    uncached.encode_texts(TEXTS)
    uncached.encode_images([str(images / f"{n}.jpg") for n in NAMES])
    assert uncached._images.embeds is None
    result = run_protocol(
        uncached.image_feat,
        uncached.text_feat,
        text_image,
        uncached.similarity,
        uncached.itm_scores,
        k_test=3,
    )
    assert torch.equal(result.recall.ranks_i2t, cached.recall.ranks_i2t)
    assert torch.equal(result.recall.ranks_t2i, cached.recall.ranks_t2i)
    assert uncached.vision_passes > len(NAMES)  # the vision tower ran again for the ITM stage


def test_itc_score_equals_recall_module(blip_scorer):
    scorer, text_image, rows = blip_scorer
    rows.clear()
    result = run_protocol(
        scorer.image_feat, scorer.text_feat, text_image, scorer.similarity, None, score="itc"
    )
    reference = retrieval_recall(
        scorer.image_feat, scorer.text_feat, text_image, torch.arange(len(text_image))
    )
    assert result.recall.i2t == reference.i2t and result.recall.t2i == reference.t2i
    assert rows == [] and result.itm_pairs == 0


def test_generative_checkpoint_is_refused(tiny_models, dataset):
    from blip_toolkit.errors import TaskNotSupportedError

    annotations, images = dataset
    with pytest.raises(TaskNotSupportedError, match="ITC/ITM"):
        evaluate_retrieval(
            RetrievalEvalConfig(
                annotations=str(annotations), images=str(images), model=str(tiny_models["blip2-opt"])
            )
        )


def test_dedupe_captions_merges_copies_into_one_text_for_every_image(strong_itm, dataset, brute, tmp_path):
    """'a photo of a cat' also captions the grass photo: --dedupe-captions scores it once, positive
    for both images; the ranks equal dense ITM + ITC ranks with that many-to-many positive mask."""
    annotations, images = dataset
    entries = json.loads(annotations.read_text())
    grass = NAMES.index("grass")
    entries[grass]["caption"] = [*entries[grass]["caption"], "a photo of a cat"]
    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(entries))
    report = evaluate_retrieval(
        RetrievalEvalConfig(
            annotations=str(doubled),
            images=str(images),
            model=str(strong_itm["blip-itm"]),
            k_test=1000,
            device="cpu",
            dedupe_captions=True,
        )
    )
    _, itc, itm = brute("blip-itm")
    final = itc + itm  # the distinct texts are TEXTS, in the same order
    positive = TEXT_IMAGE[None, :] == torch.arange(len(NAMES))[:, None]
    positive[grass, TEXTS.index("a photo of a cat")] = True
    assert report["scored"] == {"images": len(NAMES), "texts": len(TEXTS)}
    assert report["recall"]["mean_rank_i2t"] == pytest.approx(
        float(pessimistic_ranks(final, positive).double().mean())
    )
    assert report["recall"]["mean_rank_t2i"] == pytest.approx(
        float(pessimistic_ranks(final.t(), positive.t()).double().mean())
    )
