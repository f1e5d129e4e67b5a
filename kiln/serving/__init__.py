"""Pure logic behind kiln's Triton backends: parameter parsing, request validation, batching.

Nothing here imports `triton_python_backend_utils`, so unit tests run it without a server. The
backends in `backends/<name>/model.py` stay thin: decode the requests, call these, encode.
"""
