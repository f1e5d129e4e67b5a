"""kiln's model folders, importable as `kiln.models.<folder>`.

A model folder is a plain folder holding one served model (or pipeline) and everything about it:
its spec, its source settings, its build hook, its reference pipeline, its load-test inputs and
service levels, its docs (see `kiln.registry` for the contract). The folders are not inside this
package: `__path__` lists the folders that hold them, `kiln.paths.models_dirs()` (the project's
`models/`, then each folder in `KILN_MODELS`), so a user's folder anywhere on disk imports like a
built-in one, relative imports included, and nothing in kiln's source names a model.
"""

from kiln.paths import models_dirs

__path__ = [str(path) for path in models_dirs()]  # noqa: F811 (a package whose folders are configured)
