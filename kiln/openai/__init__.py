"""kiln's OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models` and
`/health`, in front of Triton's decoupled generation models (backend kiln_generate).

An ASGI app (FastAPI, `create_app`) translates each request into one request of the SDK's
`AsyncTextGenerator` over gRPC, so the official `openai` client (and anything speaking OpenAI's
API) works unchanged against kiln's models; `OpenAIServer` runs it with uvicorn on a thread, as
`kiln serve` does beside Triton (`--openai-port`). The chat template: `kiln.openai.chat`; what
the requests accept and how errors look: `kiln.openai.protocol`. Needs the `serve` extra (FastAPI,
uvicorn); `kiln.clients` does not import this package.
"""

from kiln.openai.chat import IMPLICIT_STOP, render
from kiln.openai.protocol import APIError, GenerationRequest, generation_models, parse_chat, parse_completion

__all__ = [
    "IMPLICIT_STOP",
    "APIError",
    "GenerationRequest",
    "OpenAIServer",
    "create_app",
    "generation_models",
    "parse_chat",
    "parse_completion",
    "render",
]


def __getattr__(name: str):  # the app and its server import FastAPI and uvicorn: only when used
    if name == "create_app":
        from kiln.openai.app import create_app

        return create_app
    if name == "OpenAIServer":
        from kiln.openai.server import OpenAIServer

        return OpenAIServer
    raise AttributeError(f"module 'kiln.openai' has no attribute {name!r}")
