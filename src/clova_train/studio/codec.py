"""A trained prompt served: the (embed, encode) pair that puts its vectors around each request's text."""

from __future__ import annotations

import json
from pathlib import Path

from clova_train.core.errors import ClovaError
from clova_train.evaluation.prompts import META_FILE, PROMPT_MARK, encode_pieces, load_prompt, prompt_embedder
from clova_train.evaluation.tasks import get_task


def prompt_codec(model, tok, path: str | Path):
    """(embed, encode) for a `clova ptune` directory: a request's text fills the task's one input field
    of the prompt's template, and the trained vectors go where its ``{prompt}`` marks are."""
    path = Path(path)
    meta = path / META_FILE
    if not meta.is_file():
        raise ClovaError(f"{path}: not a ptune directory (no {META_FILE}); make one with `clova ptune`")
    task = get_task(json.loads(meta.read_text(encoding="utf-8")).get("task", ""))
    if len(task.inputs) != 1:
        raise ClovaError(f"{path}: serving a p-tuned prompt needs a task with one input; {task.name} has {', '.join(task.inputs)}")
    prompt = load_prompt(path, model, task)
    parts = prompt.template.ptune_query.split(PROMPT_MARK)
    n, marks = len(prompt.vectors), len(parts) - 1
    # Placeholders are filled by splitting on the field, never by str.format on user text.
    field = "{" + task.inputs[0] + "}"

    def encode(texts: list[str]) -> list[list[int]]:
        pieces = []
        for text in texts:
            row: list[str | int] = [text.join(parts[0].split(field))]
            for i, part in enumerate(parts[1:]):
                row += [n // marks + (i < n % marks), text.join(part.split(field))]
            pieces.append([p for p in row if p != ""])
        return encode_pieces(tok, pieces, model.cfg.vocab_size)

    return prompt_embedder(model, prompt.vectors), encode
