"""Text generation with kiln's decoupled generation models (`tinylm_generate`, backend
kiln_generate): whole texts or streams of deltas, over gRPC or HTTP, blocking or asyncio.

- `TextGenerator` / `AsyncTextGenerator`: `generate(prompt, ...)` returns a `Generation` (text,
  finish_reason, prompt_tokens, completion_tokens, latency_s, request_id); `stream(prompt, ...)`
  returns a `GenerationStream` / `AsyncGenerationStream` of `GenerationDelta`s (text, and on the
  last one the finish reason and the token counts). Closing a stream before its end cancels the
  request on the server, which frees its KV cache at once.
- gRPC (`grpc://host:8001`): one bidirectional stream per request (tritonclient's streaming API);
  HTTP (`http://host:8000`): Triton's `generate` and `generate_stream` (server-sent events)
  endpoints. Same methods, same results.
- Errors are the SDK's (`kiln.clients.errors`): a bad field is an `InvalidInputError` naming it
  (`input_name`), a full engine queue a `ServerUnavailableError` (retried before the first reply
  per the client's `RetryPolicy`), and so on.

Like the other task clients, a generator takes a URL (and owns the client it makes) or borrows an
existing `Client` / `AsyncClient`.
"""

from kiln.clients._async_generate import AsyncGenerationStream, AsyncTextGenerator
from kiln.clients._generate_core import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    MODEL,
    GenerationCall,
    Progress,
    Reply,
    SSEDecoder,
    classify_stream_error,
    encode_call,
    field_of,
    generation_error,
)
from kiln.clients._sync_generate import GenerationStream, TextGenerator
from kiln.clients.results import Generation, GenerationDelta

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "MODEL",
    "AsyncGenerationStream",
    "AsyncTextGenerator",
    "Generation",
    "GenerationCall",
    "GenerationDelta",
    "GenerationStream",
    "Progress",
    "Reply",
    "SSEDecoder",
    "TextGenerator",
    "classify_stream_error",
    "encode_call",
    "field_of",
    "generation_error",
]
