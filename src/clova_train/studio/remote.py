"""`clova ptune --server`: p-tuning on this machine with the loss and input gradients from a `clova serve`.

The prompt encoder lives here; each step sends the vectors it makes to
``POST /v1/ptune/gradients`` and feeds the returned d loss / d vectors back
through the encoder (one autograd function), so :func:`train_prompt` runs
the same loop as local p-tuning and writes the same directory. Validation
asks the same endpoint for each choice's score (without a gradient), so
only classification tasks train this way: generation tasks are validated by
generating, which the endpoint does not offer.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

import torch

from clova_train.core.errors import ClovaError
from clova_train.evaluation.prompts import PromptTemplate, prompt_pieces
from clova_train.evaluation.ptune import PTuneConfig, load_task, train_prompt
from clova_train.evaluation.tasks import Example, Task, task_metrics


class ServerClient:
    """JSON over HTTP to a `clova serve`; every failure is one ClovaError line."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 600):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout = api_key, timeout

    def call(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                error = {"message": e.reason}
            raise ServerError(e.code, f"{self.base}{path}: {e.code} {error.get('message')}", error.get("param"), error.get("code")) from None
        except (urllib.error.URLError, OSError) as e:
            raise ClovaError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}; is `clova serve` running there?") from None


class ServerError(ClovaError):
    def __init__(self, status: int, message: str, param: str | None, code: str | None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class _ServerLoss(torch.autograd.Function):
    """loss(vectors) computed by the server; backward multiplies in the gradient it returned."""

    @staticmethod
    def forward(ctx, vectors, objective, indices):
        loss, grad = objective.loss_and_grad(indices, vectors.detach())
        ctx.save_for_backward(grad.to(vectors.dtype))
        return torch.tensor(loss, dtype=vectors.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


class RemoteObjective:
    """:class:`~clova_train.evaluation.ptune.LocalObjective`'s two questions, answered by a server."""

    device = torch.device("cpu")

    def __init__(self, client: ServerClient, task: Task, template: PromptTemplate, train: list[Example], valid: list[Example], cfg: PTuneConfig):
        if not task.by_likelihood:
            raise ClovaError(
                f"--server p-tunes classification tasks (nsmc, ynat, sts); {task.name} is validated by generating, "
                "which the input-gradient API does not do: run `clova ptune` where the model is"
            )
        info = client.call("/v1/ptune")
        self.client, self.task, self.cfg = client, task, cfg
        self.n_embd = info["base_model"]["n_embd"]
        self.base_model = {**info["base_model"], "name": info["model"], "server": client.base}
        self.tokenizer_hash = info.get("tokenizer_hash")
        self.chunk = info["limits"]["examples"]
        self.labels = list(template.verbalizers)
        self.choices = [template.answer_text(template.verbalizers[label]) for label in self.labels]
        self.template = template
        self.train = [self._example(ex, cfg.prompt_tokens) for ex in train]
        self.valid = {n: ([self._example(ex, n) for ex in valid], valid) for n in (0, cfg.prompt_tokens)}
        self.where = [ex.where for ex in train]

    def _example(self, example: Example, n_vectors: int) -> dict:
        """The example as the endpoint's segments: the prompt's texts, and vector j as the index j."""
        segments: list[str | int] = []
        slot = 0
        for piece in prompt_pieces(self.template, self.task, example, [], n_vectors):
            if isinstance(piece, str):
                segments.append(piece)
            else:
                segments += range(slot, slot + piece)
                slot += piece
        return {"segments": segments, "choices": self.choices, "gold": self.labels.index(example.gold)}

    def __len__(self) -> int:
        return len(self.train)

    @contextlib.contextmanager
    def frozen(self):
        yield  # the server's model is frozen already

    def _send(self, examples: list[dict], where: list[str], vectors: list, grad: bool) -> list[tuple[int, dict]]:
        """(examples, response) per request: at most the server's limit each, halved while too many tokens."""
        out = []
        for start in range(0, len(examples), self.chunk):
            part = examples[start : start + self.chunk]
            try:
                out.append((len(part), self.client.call("/v1/ptune/gradients", {"vectors": vectors, "examples": part, "score": self.cfg.score, "grad": grad})))
            except ServerError as e:
                if e.code == "too_many_tokens" and len(part) > 1:
                    half = len(part) // 2
                    out += self._send(part[:half], where[start : start + half], vectors, grad)
                    out += self._send(part[half:], where[start + half :], vectors, grad)
                    continue
                if e.param and e.param.startswith("examples.") and e.param.split(".")[1].isdigit():
                    raise ClovaError(f"{where[start + int(e.param.split('.')[1])]}: {e}") from None
                raise
        return out

    def loss_and_grad(self, indices: list[int], vectors: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The mean loss over ``indices`` and its gradient with respect to ``vectors``, from the server."""
        answers = self._send([self.train[i] for i in indices], [self.where[i] for i in indices], vectors.float().tolist(), True)
        if len(answers) == 1:
            return answers[0][1]["loss"], torch.tensor(answers[0][1]["grad"], dtype=torch.float32)
        total = sum(n for n, _ in answers)
        loss = sum(n * r["loss"] for n, r in answers) / total
        grad = sum(n * torch.tensor(r["grad"], dtype=torch.float64) for n, r in answers) / total
        return loss, grad.float()

    def loss(self, indices: list[int], vectors: torch.Tensor) -> torch.Tensor:
        return _ServerLoss.apply(vectors, self, indices)

    def validate(self, vectors: torch.Tensor | None) -> dict[str, float]:
        """Metrics from the server's scores of every choice, the label with the highest predicted (as `clova eval`)."""
        examples, originals = self.valid[0 if vectors is None else self.cfg.prompt_tokens]
        sent = [] if vectors is None else vectors.float().tolist()
        scores = [s for _, r in self._send(examples, [ex.where for ex in originals], sent, False) for s in r["scores"]]
        records = [
            {"prediction": self.labels[max(range(len(s)), key=s.__getitem__)], "gold": ex.gold} for s, ex in zip(scores, originals)
        ]
        return task_metrics(self.task, records)


def ptune_remote(url: str, api_key: str, cfg: PTuneConfig, *, show_progress: bool = True) -> dict:
    """`clova ptune --server URL`: :func:`~clova_train.evaluation.ptune.ptune` with the server's gradients."""
    task, template, train, valid = load_task(cfg)
    objective = RemoteObjective(ServerClient(url, api_key), task, template, train, valid, cfg)
    return train_prompt(objective, cfg, task, template, show_progress=show_progress)
