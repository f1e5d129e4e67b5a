"""The usual alternative: ResNet-50 served by FastAPI + PyTorch eager, the way most tutorials do it.

What the benchmark compares kiln against (target 2), written as the tutorials write it, not tuned
down and not tuned up:

- The FP32 PyTorch model (`artifacts/resnet50/checkpoint.pt`, the build's own checkpoint) is
  loaded once at startup, in eval mode, with PyTorch's default threads (one per core).
- `POST /classify` takes the image file as the request body, decodes and preprocesses it exactly
  as kiln's image_classifier does (`kiln.build.reference.image.ReferencePreprocessing` with the
  served preprocessing spec: the same decode, resize, crop and normalization, so both systems see
  the same pixels and their answers can be compared), runs the model under `torch.no_grad()`,
  and returns the top-5 labels, softmax scores and class indices as JSON.
- One request at a time: the endpoint is `async def` and computes inline, so the event loop runs
  one inference at a time (no batching, no thread pool), and uvicorn runs one worker. This is the
  tutorial pattern; it is also why the model is never run twice concurrently.

Run: `python -m uvicorn benchmarks.baseline_fastapi:app --port 8080` from the repository root.
`KILN_BASELINE_DEVICE=cuda` puts the model on the GPU (the same code otherwise).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request

from kiln import tensors

DEVICE_ENV = "KILN_BASELINE_DEVICE"
PIPELINE_ENV = "KILN_BASELINE_PIPELINE"
"""The served pipeline whose preprocessing, labels and k the baseline copies (its FP32 model)."""

STATE: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Loads the model once, at startup."""
    from kiln.build.pipeline import source_stage
    from kiln.build.reference.image import ReferencePreprocessing, pipeline

    spec = pipeline(os.environ.get(PIPELINE_ENV, tensors.IMAGE_CLASSIFIER))
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    model = source_stage(spec.built).load_trained(spec.built).eval().to(device)
    STATE.update(
        model=model,
        device=device,
        preprocess=ReferencePreprocessing(spec.preprocess),
        labels=spec.labels,
        top_k=spec.top_k,
    )
    yield
    STATE.clear()


app = FastAPI(title="FastAPI + PyTorch eager baseline", lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    """Ready once the model is loaded."""
    return {"status": "ready" if "model" in STATE else "loading"}


@app.post("/classify")
async def classify(request: Request) -> dict[str, Any]:
    """The image file in the body -> top-k labels, scores and class indices."""
    data = await request.body()
    try:
        pixels = STATE["preprocess"]([data])
    except Exception as error:  # noqa: BLE001 - any undecodable upload is the client's error
        raise HTTPException(status_code=400, detail=f"cannot decode the image: {error}") from error
    with torch.no_grad():
        logits = STATE["model"](torch.from_numpy(pixels).to(STATE["device"]))
        probabilities = torch.softmax(logits, dim=1)
        scores, indices = torch.topk(probabilities, STATE["top_k"], dim=1)
    indices_list = indices[0].cpu().tolist()
    return {
        "labels": [STATE["labels"][i] for i in indices_list],
        "scores": scores[0].cpu().tolist(),
        "class_indices": indices_list,
    }
