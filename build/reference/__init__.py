"""In-process reference pipelines: the served pipelines' steps in one Python process, no Triton.

Each module mirrors one served ensemble with the build's own code and the PyTorch model (the
yardstick of issue 4's end-to-end tests), e.g. `kiln.build.reference.image`.
"""
