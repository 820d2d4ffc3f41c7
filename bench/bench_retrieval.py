"""Retrieval throughput on CPU (ITC shortlist + ITM re-rank) against the strongest plain baseline and
against the machine's limit.

`blip retrieval --shortlist 16` (the library call: `rank_texts` through `open_runner`, the CLI's
default worker setting) on a BLIP-base-sized ITM model (`BlipForImageTextRetrieval` with
transformers' default BlipConfig: ViT-B/16 at 384 px, BERT-base text encoder, random weights, a
tokenizer of BLIP's 30,524 tokens): 32 JPEG photos of 640x480 against 100 candidate texts, batch 8;
each image's 16 texts of highest ITC are re-scored with ITM + ITC (LAVIS's protocol). Against, in the
same rounds:

(a) a hand-written loop over transformers' BLIP modules doing the same (what LAVIS's
    `compute_sim_matrix` does): text features once per call, per batch of 8 images the vision tower
    and ITC, then per image the ITM head on its 16 best texts ([ENC] as first token, as LAVIS), the
    shortlist ranked by ITM logit + ITC; images opened with PIL in the main process;
(b) the matmul roofline: FLOPs from the shapes (images, texts, ITM pairs; bench/_flops.py) over the
    best float32 matmul rate measured in the rounds.

Equal outputs: every image's ranked shortlist in the same order, scores within 1e-4. Plus
`--dtype bfloat16` and `--quantize int8` rows (agreement of the top text with float32), a profile
and the levers. `--quick`: a tiny model, 2 rounds of 2 images, 20 texts, shortlist 4.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    MatmulProbe,
    build_blip,
    environment,
    interleaved_rounds,
    make_photos,
    parse_args,
    rate_range,
    ratio_target,
    report,
    target,
    timed_calls,
)
from _flops import retrieval_flops

TARGET = 1.3
SUBJECTS = (
    "a cat",
    "a dog",
    "two cats",
    "a man",
    "a child",
    "a red car",
    "a bowl of fruit",
    "a bike",
    "a kite",
    "a tree",
)
PLACES = ("on a couch", "in a park", "down a street", "next to a tree", "on a table", "under the sky",
          "in the picture", "by the lazy dog", "with a blue car", "at night")  # fmt: skip


def candidate_texts(count: int) -> list[str]:
    """`count` captions of a few lengths: a subject and a place, some twice as long."""
    texts = []
    for i in range(count):
        subject, place = SUBJECTS[i % 10], PLACES[(i // 10) % 10]
        texts.append(f"{subject} {place}" + (f" and {SUBJECTS[(i + 3) % 10]}" if i % 3 == 0 else ""))
    return texts


class Ours:
    def __init__(
        self, model_dir, texts, batch, shortlist, *, dtype="float32", quantize=None, num_workers=None
    ):
        from blip_toolkit.models.loading import open_runner
        from blip_toolkit.predictors.options import RetrievalOptions

        self.runner = open_runner(str(model_dir), "retrieval", device="cpu", dtype=dtype, quantize=quantize)
        self.texts = texts
        self.options = RetrievalOptions(batch_size=batch, shortlist=shortlist, num_workers=num_workers)
        self.ranked: dict[str, list[tuple[str, float]]] = {}

    def __call__(self, paths: list[str]) -> None:
        from blip_toolkit.data.images import InputItem
        from blip_toolkit.jobs.predict import rank_texts

        for path, record in zip(
            paths, rank_texts(self.runner, [InputItem(p) for p in paths], self.texts, self.options)
        ):
            self.ranked[path] = [(r["text"], r["score"]) for r in record["results"]]


class Reference:
    """LAVIS's procedure written over transformers' BlipForImageTextRetrieval modules."""

    def __init__(self, model_dir, texts, batch, shortlist):
        import torch
        import transformers

        self.torch, self.texts, self.batch, self.k = torch, texts, batch, shortlist
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
        self.model = transformers.BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
        self.enc = self.processor.tokenizer.convert_tokens_to_ids("[ENC]")
        self.ranked: dict[str, list[tuple[str, float]]] = {}
        self.itm_pairs = 0
        self.tokens = 0

    def __call__(self, paths: list[str]) -> None:
        import torch.nn.functional as F
        from PIL import Image

        torch, model = self.torch, self.model
        with torch.inference_mode():
            text = self.processor.tokenizer(self.texts, padding=True, truncation=True, return_tensors="pt")
            self.tokens = text["input_ids"].shape[1]
            hidden = model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            text_feat = F.normalize(model.text_proj(hidden.last_hidden_state[:, 0]), dim=-1)
            itm_ids = text["input_ids"].clone()
            itm_ids[:, 0] = self.enc
            for start in range(0, len(paths), self.batch):
                chunk = paths[start : start + self.batch]
                images = [Image.open(p).convert("RGB") for p in chunk]
                pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
                image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
                image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
                itc = image_feat @ text_feat.t()
                top = itc.topk(min(self.k, len(self.texts)), dim=1).indices
                for i, path in enumerate(chunk):
                    index = top[i]
                    embeds = image_embeds[i : i + 1].expand(len(index), -1, -1)
                    out = model.text_encoder(
                        input_ids=itm_ids[index],
                        attention_mask=text["attention_mask"][index],
                        encoder_hidden_states=embeds,
                        encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                    ).last_hidden_state
                    score = model.itm_head(out[:, 0])[:, 1] + itc[i, index]
                    self.itm_pairs += len(index)
                    order = sorted(range(len(index)), key=lambda j: -float(score[j]))
                    self.ranked[path] = [(self.texts[int(index[j])], float(score[j])) for j in order]


def equal_rankings(a: dict, b: dict, tolerance: float = 1e-4) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if [t for t, _ in a[key]] != [t for t, _ in b[key]]:
            return False
        if any(abs(x - y) > tolerance for (_, x), (_, y) in zip(a[key], b[key])):
            return False
    return True


def top_agreement(run: dict, base: dict) -> float:
    return sum(run.get(k, [("", 0)])[0][0] == v[0][0] for k, v in base.items()) / max(1, len(base))


def eager_text_attention(model) -> None:
    """Back to transformers' own BLIP text attention (ITM then projects the image per pair)."""
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    for module in model.modules():
        if isinstance(module, BlipTextSelfAttention) and "forward" in vars(module):
            del module.forward


def profile_run(run, model, paths) -> dict:
    vision, text = [], []
    start = time.perf_counter()
    with timed_calls(model.vision_model, vision), timed_calls(model.text_encoder, text):
        run(paths)
    wall = time.perf_counter() - start
    return {
        "vision tower": sum(vision),
        "text encoder: texts (ITC) + ITM pairs": sum(text),
        "everything else (ITC, ranking, preprocessing, pipeline)": wall - sum(vision) - sum(text),
        "total": wall,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch
    from transformers import BlipConfig

    from blip_toolkit.log import setup_logging

    setup_logging(-1)
    quick = args.quick
    rounds, count, batch, n_texts, k = (2, 4, 2, 20, 4) if quick else (4, 32, 8, 100, 16)
    probe_size, probe_seconds = (256, 0.1) if quick else (1024, 1.0)
    probes = {
        "matmul float32 (torch: MKL)": MatmulProbe(probe_size, probe_seconds),
        "matmul float32 (oneDNN, packed)": MatmulProbe(probe_size, probe_seconds, kernel="onednn"),
        "matmul bfloat16 (oneDNN, packed)": MatmulProbe(
            probe_size, probe_seconds, kernel="onednn", dtype=torch.bfloat16
        ),
    }
    texts = candidate_texts(n_texts)
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = [str(p) for p in make_photos(tmp / "photos", count)]
        model_dir = build_blip(tmp, "BlipForImageTextRetrieval", quick)
        config = BlipConfig.from_pretrained(model_dir)
        runs = {
            "blip retrieval float32": Ours(model_dir, texts, batch, k),
            "transformers loop float32": Reference(str(model_dir), texts, batch, k),
            "blip retrieval --quantize int8": Ours(model_dir, texts, batch, k, quantize="int8"),
            "blip retrieval --dtype bfloat16": Ours(model_dir, texts, batch, k, dtype="bfloat16"),
        }
        for run in runs.values():
            run(photos[:1])  # warm-up
        per_round = count // rounds
        iterators = {
            name: iter([photos[i * per_round : (i + 1) * per_round] for i in range(rounds)]) for name in runs
        }
        functions = {name: (lambda n=name: runs[n](next(iterators[n]))) for name in runs}
        times = interleaved_rounds({**functions, **probes}, rounds, warmup=0)

        ours, ref = runs["blip retrieval float32"], runs["transformers loop float32"]
        same = equal_rankings(ours.ranked, ref.ranked) and len(ours.ranked) == count
        # FLOPs of one round's share: its images, every text once, k ITM pairs per image.
        flops = retrieval_flops(config, per_round, n_texts, ref.tokens, per_round * k)
        fp32_rate = max(
            probes[n].flops / statistics.median(times[n])
            for n in ("matmul float32 (torch: MKL)", "matmul float32 (oneDNN, packed)")
        )
        bf16_rate = probes["matmul bfloat16 (oneDNN, packed)"].flops / statistics.median(
            times["matmul bfloat16 (oneDNN, packed)"]
        )
        reference_time = statistics.median(times["transformers loop float32"])
        rows = []
        for name, run in runs.items():
            seconds = statistics.median(times[name])
            rate = bf16_rate if "bfloat16" in name else fp32_rate
            rows.append(
                {
                    "model": "BLIP-base ITM (224M)" if not quick else "BLIP ITM (tiny)",
                    "run": name,
                    "images/s (slowest-fastest round)": rate_range(times[name], per_round),
                    "vs transformers loop float32": reference_time / seconds,
                    "of the matmul roofline": None
                    if "int8" in name
                    else flops / seconds / rate,  # int8: not a float roofline
                    "top text = blip float32": top_agreement(run.ranked, ours.ranked),
                    "rankings = transformers float32 (order, scores within 1e-4)": equal_rankings(
                        run.ranked, ref.ranked
                    ),
                }
            )
        rows.append(
            {
                "model": rows[0]["model"],
                "run": "roofline float32 (FLOPs / the best float32 matmul rate)",
                "images/s (slowest-fastest round)": per_round * fp32_rate / flops,
                "of the matmul roofline": 1.0,
            }
        )
        sample = photos[:batch]
        profile_rows = [
            {"run": "blip retrieval float32", **profile_run(ours, ours.runner.loaded.model, sample)},
            {"run": "transformers loop float32", **profile_run(ref, ref.model, sample)},
        ]
        tokens = ref.tokens
        runs.clear()
        ours = ref = None
        plain = Ours(model_dir, texts, batch, k, num_workers=0)
        per_pair = Ours(model_dir, texts, batch, k, num_workers=0)
        eager_text_attention(per_pair.runner.loaded.model)
        grouped_lever = interleaved_rounds(
            {"shipped": lambda: plain(sample), "other": lambda: per_pair(sample)}, 2
        )
        per_pair = None
        with environment(BLIP_PACKED_LINEAR="0"):
            unpacked = Ours(model_dir, texts, batch, k, num_workers=0)
        packed_lever = interleaved_rounds(
            {"shipped": lambda: plain(sample), "other": lambda: unpacked(sample)}, 2
        )

    def lever(times):
        return round(statistics.median(times["other"]) / statistics.median(times["shipped"]), 3)

    notes = {
        "rounds": f"{rounds} x {per_round} images (batch {batch}) against {n_texts} texts: each run in turn, "
        "then the matmul probes",
        "shortlist (ITM pairs per image)": k,
        "text tokens (padded)": tokens,
        "GFLOP per image (the share of the texts included)": round(flops / per_round / 1e9, 2),
        "matmul GFLOP/s in the rounds (torch MKL fp32 / oneDNN fp32 / oneDNN bf16)": " / ".join(
            f"{probes[n].flops / statistics.median(times[n]) / 1e9:.0f}" for n in probes
        ),
        "rankings identical to the transformers loop (float32)": same,
        "lever: ITM with each image's keys / values once (fused text attention), time of per-pair "
        "eager ITM over shipped": lever(grouped_lever),
        "lever: oneDNN-packed Linear, time without / with": lever(packed_lever),
    }
    report(
        "retrieval",
        rows,
        quick=quick,
        targets=[
            ratio_target(
                "blip retrieval float32 vs the transformers loop (images/s)",
                times["transformers loop float32"],
                times["blip retrieval float32"],
                f">= {TARGET}",
                lambda r: r >= TARGET,
            ),
            target("rankings identical to the transformers loop (float32)", float(same), "1", same),
        ],
        notes=notes,
        tables={"where the time goes (one batch, seconds)": profile_rows},
    )


if __name__ == "__main__":
    main()
