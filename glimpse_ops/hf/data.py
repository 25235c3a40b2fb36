"""Training data for the trainers: a JSON-lines file of (image, question, answer) records made
into model batches with the model's own processor.

Each line: ``{"image": "path/to/image.png", "question": "...", "answer": "..."}`` (a relative
image path is relative to the file's folder). A batch is the processor's prompt inputs (left
padded) plus ``answer_ids`` [B, A]: the answer's tokens and the end-of-sequence token, -100
after them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

KEYS = ("image", "question", "answer")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file, image paths resolved; a clear error names the line."""
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

    def __init__(self, path: str | Path) -> None:
        self.records = read_jsonl(path)

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

    def __init__(self, processor) -> None:
        self.processor = processor
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
        answers = [
            self.tokenizer(item["answer"], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            for item in items
        ]
        answer_ids = torch.full((len(items), max(len(a) for a in answers)), -100, dtype=torch.long)
        for row, ids in enumerate(answers):
            answer_ids[row, : len(ids)] = torch.tensor(ids)
        batch = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        return {**batch, "answer_ids": answer_ids}
