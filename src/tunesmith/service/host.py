"""The model host: a process that keeps tuned models loaded and answers generation and
classification for the web app, over loopback HTTP (`tunesmith serve` starts it on a free port).

It exists so that the web process never imports torch and a slow generation never blocks the API.
Models load on first use and stay loaded (least recently used beyond `MAX_LOADED` are dropped); one
computation runs at a time, and a streamed answer sends each piece of text as tokens are chosen
(as newline-delimited JSON: `{"delta": ...}` lines, then one `{"done": true, ...}`).
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

__all__ = ["MAX_LOADED", "create_host"]

MAX_LOADED = 4


class GenerateBody(BaseModel):
    run: str
    prompt: str | list[dict[str, Any]]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class PredictBody(BaseModel):
    run: str
    texts: list[str]


class Models:
    """Loaded runs by directory, least recently used first; one computation at a time."""

    def __init__(self) -> None:
        self.loaded: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, run: str) -> Any:
        from tunesmith import api

        if run in self.loaded:
            self.loaded.move_to_end(run)
            return self.loaded[run]
        adapters = api.load_adapters([run])
        self.loaded[run] = adapters
        while len(self.loaded) > MAX_LOADED:
            self.loaded.popitem(last=False)
        return adapters

    def generate(self, body: GenerateBody, on_text: Any) -> dict[str, Any]:
        from tunesmith import api

        with self.lock:
            adapters = self.get(body.run)
            trained = adapters.use()
            tokenizer = trained.objective.tokenizer
            stream = api.TextStream(tokenizer, on_text)
            sampling = api.Sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed)
            text = api.generate(adapters, [body.prompt], sampling, stream)[0]  # type: ignore[arg-type]
            stream.finish(text)
            stopped = len(stream.tokens) < body.max_new_tokens
            return {
                "done": True,
                "text": text,
                "finish_reason": "stop" if stopped else "length",
                "prompt_tokens": _prompt_tokens(tokenizer, body.prompt),
                "completion_tokens": len(stream.tokens),
            }

    def predict(self, body: PredictBody) -> list[dict[str, Any]]:
        from tunesmith import api

        with self.lock:
            return api.predict(self.get(body.run), body.texts)


def _prompt_tokens(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer(" ".join(str(m.get("content", "")) for m in prompt))["input_ids"])


def create_host(data_dir: Path) -> FastAPI:
    """The host's app; it answers only for run directories inside `data_dir`."""
    app = FastAPI(title="tunesmith model host", docs_url=None, redoc_url=None)
    models = Models()
    root = data_dir.resolve()

    def checked(run: str) -> str:
        path = Path(run).resolve()
        if not path.is_relative_to(root) or not (path / "config.yaml").is_file():
            raise ValueError(f"{run}: not a run of this server")
        return str(path)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": list(models.loaded)}

    @app.post("/predict")
    def predict(body: PredictBody) -> Any:
        try:
            body.run = checked(body.run)
            return {"data": models.predict(body)}
        except Exception as exc:  # the web app turns this into an OpenAI-shaped error
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)

    @app.post("/generate")
    def generate(body: GenerateBody) -> StreamingResponse:
        pieces: queue.Queue[dict[str, Any] | None] = queue.Queue()

        def work() -> None:
            try:
                body.run = checked(body.run)
                pieces.put(models.generate(body, lambda text: pieces.put({"delta": text})))
            except Exception as exc:  # sent to the client as the stream's last line
                pieces.put({"error": f"{type(exc).__name__}: {exc}"})
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()

        def lines() -> Iterator[str]:
            while (piece := pieces.get()) is not None:
                yield json.dumps(piece) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app
