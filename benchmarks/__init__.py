"""kiln's benchmark (`make bench`, `python -m benchmarks.run`): kiln measured side by side with
the in-process reference pipelines and the FastAPI + PyTorch eager baseline, on one machine, in one
run, with one load generator and one request mix. See `benchmarks/run.py` for the comparisons."""
