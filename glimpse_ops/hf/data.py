"""Training data for the trainers: a JSON-lines file of (image, question, answer) records made
into model batches with the model's own processor.

Each line: ``{"image": "path/to/image.png", "question": "...", "answer": "..."}`` (a relative
image path is relative to the file's folder), and for GlimpsePrune+'s GRPO stage with box keep
sets ``"boxes": [[x1, y1, x2, y2], ...]`` (normalized to [0, 1], the image's region the answer
needs). A batch is the processor's prompt inputs (left padded) plus ``answer_ids`` [B, A]: the
answer's tokens and the end-of-sequence token, -100 after them; for GRPO (``Collator(...,
grpo=True)``) the prompt inputs plus ``questions``, ``answers`` and ``boxes`` (lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

KEYS = ("image", "question", "answer")


def _check_boxes(boxes) -> bool:
    return (
        isinstance(boxes, list)
        and len(boxes) > 0
        and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in b)
            and b[0] <= b[2] and b[1] <= b[3]
            for b in boxes
        )
    )  # fmt: skip


def read_jsonl(path: str | Path, require_boxes: bool = False) -> list[dict]:
    """The records of a JSON-lines file, image paths resolved; a clear error names the line.
    ``require_boxes``: every record needs ``boxes`` (normalized xyxy lists)."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"glimpse_ops.hf.data: {path}:{number} is not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"glimpse_ops.hf.data: {path}:{number} is not a JSON object")
        missing = [k for k in KEYS if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"glimpse_ops.hf.data: {path}:{number} needs string fields {missing}")
        if require_boxes and not _check_boxes(record.get("boxes")):
            raise ValueError(
                f'glimpse_ops.hf.data: {path}:{number} needs "boxes": a list of [x1, y1, x2, y2] normalized to '
                f"[0, 1] (box keep sets), got {record.get('boxes')!r}"
            )
        image = Path(record["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"glimpse_ops.hf.data: {path}:{number}: no image at {image}")
        records.append({**record, "image": str(image)})
    if not records:
        raise ValueError(f"glimpse_ops.hf.data: {path} has no records")
    return records


class JsonlDataset(Dataset):
    """``read_jsonl`` records; an item is the record with its image opened (RGB, Pillow)."""

    def __init__(self, path: str | Path, require_boxes: bool = False) -> None:
        self.records = read_jsonl(path, require_boxes)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        record = self.records[index]
        with Image.open(record["image"]) as image:
            return {**record, "image": image.convert("RGB")}


class Collator:
    """Items -> a training batch with ``processor`` (the model's ``AutoProcessor``): the prompt
    is the processor's chat template over an image and the question when it has one, else
    the image token, a newline and the question."""

    def __init__(self, processor, grpo: bool = False) -> None:
        self.processor, self.grpo = processor, grpo
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or getattr(self.tokenizer, "eos_token_id", None) is None:
            raise TypeError("glimpse_ops.hf.data.Collator: the processor needs a tokenizer with an eos token")
        self.tokenizer.padding_side = "left"

    def prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "image_token", None)
        if token is None:
            raise TypeError(
                "glimpse_ops.hf.data.Collator: the processor has neither a chat template nor an image_token"
            )
        return f"{token}\n{question}"

    def __call__(self, items: list[dict]) -> dict:
        texts = [self.prompt(item["question"]) for item in items]
        inputs = self.processor(text=texts, images=[item["image"] for item in items], padding=True, return_tensors="pt")
        if self.grpo:
            batch = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
            text = {"questions": [item["question"] for item in items], "answers": [item["answer"] for item in items]}
            return {**batch, **text, "boxes": [item.get("boxes") for item in items]}  # one image per record
        answers = [
            self.tokenizer(item["answer"], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            for item in items
        ]
        answer_ids = torch.full((len(items), max(len(a) for a in answers)), -100, dtype=torch.long)
        for row, ids in enumerate(answers):
            answer_ids[row, : len(ids)] = torch.tensor(ids)
        batch = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        return {**batch, "answer_ids": answer_ids}
