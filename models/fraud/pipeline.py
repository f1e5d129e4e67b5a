"""fraud_scorer: a transaction record -> kiln_tabular -> fraud -> kiln_threshold -> score, decision.

Three served models and the pipeline that runs them (fused by default: one kiln_fused model
running the three steps in one process; the ensemble form wires the three served models):
- `fraud_features` (kiln_tabular): RECORD BYTES [1] (a JSON object of the named features in raw
  units) or FEATURE_VALUES FP32 [features] (the same numbers in the build's order); a request
  sends exactly one -> FRAUD_FEATURES FP32 [features], standardized with the `features.json` the
  build published beside `fraud` (the training split's mean and std).
- `fraud` (FP32; the model of this folder, `spec.py`): standardized features -> FRAUD_PROBABILITY.
- `fraud_threshold` (kiln_threshold): the probability -> SCORE FP32 [1] (unchanged) and DECISION
  BOOL [1] (score >= the threshold the fraud build chose and published as `decision.json`).
Both pipeline inputs are optional (Triton's `optional: true`); the integration tests send each
alone through the served pipeline, in both forms.

Batching: every step keeps its dynamic batcher at fraud's max_batch_size (256), which is also the
ensemble's (the pipeline contract). The processing steps are cheap next to a request's round trip
(kiln_tabular parses a record in about 10 us), so they wait only `STEP_QUEUE_DELAY_US` for other
requests to join a batch.
"""

from __future__ import annotations

from kiln import tensors
from kiln.serving.threshold import DECISION_FILE as DECISION_FILE  # what the fraud build publishes
from kiln.spec import DynamicBatching, EnsembleSpec, EnsembleStep, Fused, InstanceGroup, ModelSpec, TensorSpec

from .spec import SOURCE
from .spec import SPEC as FRAUD

FEATURES_MODEL = "fraud_features"
"""The kiln_tabular step's model name."""
THRESHOLD_MODEL = "fraud_threshold"
"""The kiln_threshold step's model name."""
MAX_BATCH_SIZE = FRAUD.max_batch_size
"""The pipeline contract's batch size (256): fraud's own."""
STEP_QUEUE_DELAY_US = 100
"""How long the processing steps wait for other requests to join a batch."""
STATS_FILE = "features.json"
"""What the build publishes beside fraud (`kiln.models.fraud.build.FEATURES_FILE`)."""

MIN_RECALL = SOURCE.min_recall
"""The stated trade-off: catch at least 4 in 5 frauds, with as few false alarms as that allows.
The build (`kiln.models.fraud.build.derived`) picks the highest threshold on a `SOURCE.threshold_step`
grid whose recall on the held-out split reaches it, from the model it just trained, and publishes
it; no threshold is written here, because trained weights (and so the threshold that meets the
rule) differ between CPUs. `python -m kiln.models.fraud.reference` prints the trade-off around it.
The data are synthetic: re-choose the rule for real traffic and its costs."""

_features = TensorSpec(tensors.FRAUD_FEATURES, "FP32", (SOURCE.features,))
_probability = TensorSpec(tensors.FRAUD_PROBABILITY, "FP32", (1,))
_record = TensorSpec(tensors.RECORD, "BYTES", (1,), optional=True)
_values = TensorSpec(tensors.FEATURE_VALUES, "FP32", (SOURCE.features,), optional=True)
_score = TensorSpec(tensors.SCORE, "FP32", (1,))
_decision = TensorSpec(tensors.DECISION, "BOOL", (1,))

FEATURES_SPEC = ModelSpec(
    name=FEATURES_MODEL,
    description="kiln_tabular: JSON records or raw feature values -> fraud's standardized features",
    backend="kiln_tabular",
    inputs=(_record, _values),
    outputs=(_features,),
    max_batch_size=MAX_BATCH_SIZE,
    dynamic_batching=DynamicBatching(max_queue_delay_us=STEP_QUEUE_DELAY_US),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={"stats_model": FRAUD.name, "stats_file": STATS_FILE},
)

THRESHOLD_SPEC = ModelSpec(
    name=THRESHOLD_MODEL,
    description=(
        f"kiln_threshold: fraud probability -> score and decision (score >= the threshold the "
        f"fraud build chose for held-out recall >= {MIN_RECALL:g}, published as {DECISION_FILE})"
    ),
    backend="kiln_threshold",
    inputs=(_probability,),
    outputs=(_score, _decision),
    max_batch_size=MAX_BATCH_SIZE,
    dynamic_batching=DynamicBatching(max_queue_delay_us=STEP_QUEUE_DELAY_US),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={"threshold_model": FRAUD.name, "threshold_file": DECISION_FILE},
)

FRAUD_SCORER = EnsembleSpec(
    name=tensors.FRAUD_SCORER,
    description="transaction record -> standardize -> fraud (FP32) -> score, decision at the threshold",
    inputs=(_record, _values),
    outputs=(_score, _decision),
    steps=(
        EnsembleStep(
            FEATURES_MODEL,
            inputs={tensors.RECORD: tensors.RECORD, tensors.FEATURE_VALUES: tensors.FEATURE_VALUES},
            outputs={tensors.FRAUD_FEATURES: tensors.FRAUD_FEATURES},
        ),
        EnsembleStep(
            FRAUD.name,
            inputs={tensors.FRAUD_FEATURES: tensors.FRAUD_FEATURES},
            outputs={tensors.FRAUD_PROBABILITY: tensors.FRAUD_PROBABILITY},
        ),
        EnsembleStep(
            THRESHOLD_MODEL,
            inputs={tensors.FRAUD_PROBABILITY: tensors.FRAUD_PROBABILITY},
            outputs={tensors.SCORE: tensors.SCORE, tensors.DECISION: tensors.DECISION},
        ),
    ),
    max_batch_size=MAX_BATCH_SIZE,
    # The form (kiln.spec.PIPELINE_FORMS; docs/pipelines.md, "Fused pipelines"): fused, the faster
    # one here. Measured side by side on one tritonserver (`.venv/bin/python -m benchmarks.fused
    # --repeats 3 --no-metrics-variant --delay-variant`, perf_analyzer over gRPC, the loadtest mix,
    # medians of 3; 2-core AMD EPYC, 2026-12-04), against an identity Python model as the floor:
    #   c=1:  ensemble p50 2.26 ms / p99 5.35 ms (424/s); fused p50 0.78 / p99 1.43 ms (1,202/s);
    #         floor p50 0.39 / p99 0.83 ms (2,361/s)
    #   c=16: ensemble 1,493/s; fused 2,016/s; floor 6,457/s
    # `make bench` serves the other form beside it and reports both (its forms table). The
    # ensemble form (dataclasses.replace(FRAUD_SCORER, form="ensemble")) lets the steps scale and
    # be placed and versioned apart. The fused batcher's settings were chosen by
    # `kiln tune fraud_scorer --form fused` (models/fraud/tuning.md): no queue delay, preferred
    # 8 and 16.
    form="fused",
    fused=Fused(
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(8, 16), max_queue_delay_us=0),
        instance_groups=(InstanceGroup(kind="CPU", count=1),),
    ),
)

SPECS = (FEATURES_SPEC, THRESHOLD_SPEC, FRAUD_SCORER)
"""The fraud_scorer pipeline: its two processing steps and the ensemble."""
