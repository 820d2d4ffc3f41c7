"""`RetrievalOptions(shortlist=k)`: each image's k texts of highest ITC, re-scored by ITM + ITC
exactly as the full ranking scores them, and nothing else listed (LAVIS's k_test re-ranking)."""

from __future__ import annotations

import pytest

from blip_toolkit.data.images import InputItem
from blip_toolkit.errors import UsageError
from blip_toolkit.jobs.predict import rank_texts
from blip_toolkit.models.loading import open_runner
from blip_toolkit.predictors.options import RetrievalOptions

TEXTS = [
    "a photo of a cat",
    "a dog",
    "two cats laying on a couch",
    "a red car parked next to a tree",
    "a bowl of fruit on a table",
    "a man riding a bike down a street",
]


@pytest.mark.parametrize("kind", ["blip-itm", "blip2-itm"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_shortlist_reranks_the_best_itc_texts(tiny_models, sample_images, kind, k):
    runner = open_runner(str(tiny_models[kind]), "retrieval", device="cpu")
    items = [InputItem(str(p)) for p in sample_images[:5]]
    full = list(rank_texts(runner, items, TEXTS, RetrievalOptions(batch_size=2)))
    short = list(rank_texts(runner, items, TEXTS, RetrievalOptions(batch_size=3, shortlist=k)))
    for everything, shortlisted in zip(full, short, strict=True):
        by_itc = sorted(everything["results"], key=lambda r: -r["itc"])[:k]
        expected = sorted(by_itc, key=lambda r: -r["score"])
        got = shortlisted["results"]
        assert [r["text"] for r in got] == [r["text"] for r in expected]
        for a, b in zip(got, expected):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["itm"] == pytest.approx(b["itm"], abs=1e-5)
        assert [r["rank"] for r in got] == list(range(1, k + 1))
        assert sum(r["probability"] for r in got) == pytest.approx(1.0)


def test_shortlist_needs_the_itm_head(tiny_models):
    runner = open_runner(str(tiny_models["blip-itm"]), "retrieval", device="cpu")
    with pytest.raises(UsageError, match="--shortlist"):
        list(rank_texts(runner, [], TEXTS, RetrievalOptions(score="itc", shortlist=2)))
    with pytest.raises(UsageError, match="at least 1"):
        RetrievalOptions(shortlist=0)


def test_shortlist_is_part_of_the_fingerprint_only_when_set():
    assert "shortlist" not in RetrievalOptions().fingerprint(TEXTS)
    assert RetrievalOptions(shortlist=4).fingerprint(TEXTS)["shortlist"] == 4
