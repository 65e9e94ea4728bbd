"""A real instruct model (SmolLM2-135M-Instruct) through GenAI's NPU pipeline compiled for the
CPU (``--emulate-npu``): the documented output shapes and the memory job's schema, on real
answers rather than the tiny model's random tokens.  The model is on development machines only
(../shared/models), so these tests skip on a fresh one.  Apart from test_npu_path.py so that
pytest-xdist can run the two in parallel: this module is ~40 s of generation on two cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import worker
from test_npu_path import path_settings
from test_real_model import DEMO_INPUTS
from test_real_model import assert_documented_shape

# SmolLM2-135M-Instruct as an int8-sym IR (../shared/models/README.md): the GGUF cannot go through
# the NPU pipeline, this export can.  Not on a fresh machine, so these tests skip there.
SMOLLM2_IR = Path(os.environ.get("NPU_WORKER_SMOLLM2_IR", Path(__file__).resolve().parents[2] / "shared" / "models"
                                 / "smollm2-135m-instruct-int8-sym-ov"))
needs_smollm2_ir = pytest.mark.skipif(not (SMOLLM2_IR / "openvino_model.xml").is_file(),
                                      reason=f"the SmolLM2 IR is not at {SMOLLM2_IR} (set NPU_WORKER_SMOLLM2_IR)")


@pytest.fixture(scope="module")
def smollm2_npu_worker(tmp_path_factory: pytest.TempPathFactory) -> worker.Worker:
    settings = path_settings(tmp_path_factory.mktemp("smollm2"), "npu", model_path=SMOLLM2_IR)
    built = worker.build_worker(settings, worker.load_genai_pipeline)
    built.load()
    return built


@needs_smollm2_ir
@pytest.mark.parametrize("job", list(worker.JOBS))
def test_a_real_instruct_model_gives_the_documented_shapes_on_the_npu_path(
    smollm2_npu_worker: worker.Worker, job: str
) -> None:
    for text in DEMO_INPUTS:
        # No except for EmptyOutput, as in test_real_model: these are real inputs the model
        # answers, and a swallowed 502 let every case pass with no answer at all.
        result = smollm2_npu_worker.run(worker.JobRequest(job, text), "r1")
        assert result["npu_proof"] == "emulated"
        assert_documented_shape(result)


@needs_smollm2_ir
def test_a_real_instruct_model_writes_schema_json_on_the_npu_path(smollm2_npu_worker: worker.Worker) -> None:
    result = smollm2_npu_worker.run(worker.JobRequest("memory_candidate", DEMO_INPUTS[2], max_new_tokens=256), "r1")
    assert result["text"].lstrip().startswith("{")  # the schema, not the model's habits
    if result["finish_reason"] == "stop":
        assert result["json_valid"] is True
        json.loads(result["text"])
