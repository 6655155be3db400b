"""`raykd export`: a trained student as ONNX (pixels in [0, 1] -> logits), run by onnxruntime."""

import os

import numpy as np
import pytest
import torch
from conftest import digits_cfg


def test_exported_student_matches_pytorch(tmp_path, cli, digits):
    import onnxruntime as ort

    from raykd.pipeline.models.checkpoints import load_state_dict
    from raykd.pipeline.models.zoo import build_model
    from raykd.pipeline.stages.students import run_distill

    overrides = ["method.name=ce", "distill.teachers=online", "distill.optim.epochs=2", "distill.student.arch=cnn8"]
    rec = run_distill(digits_cfg(str(tmp_path), *overrides))
    code, out, err = cli("export", "--student", rec["name"], f"run.out_dir={tmp_path}", *overrides)
    assert code == 0, err
    path = os.path.join(tmp_path, "students", rec["name"], "student.onnx")
    assert path in out and "onnxruntime agrees with PyTorch" in out
    # the test split as a deployed model would see it: uint8 images / 255, any batch size
    pixels = (digits.test.images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    logits = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert logits.shape == (len(digits.test), 10)
    student = build_model("cnn8", 10, 1)
    student.load_state_dict(load_state_dict(os.path.join(tmp_path, "students", rec["name"], "student.safetensors")))
    with torch.no_grad():
        mean, std = torch.tensor(digits.mean).view(1, -1, 1, 1), torch.tensor(digits.std).view(1, -1, 1, 1)
        want = student.eval()((torch.from_numpy(pixels) - mean) / std).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == digits.test.labels).mean() == pytest.approx(rec["test_acc"], abs=1e-9)

    code, _, err = cli("export", "--student", "nobody", f"run.out_dir={tmp_path}")
    assert code != 0 and "no finished student 'nobody'" in err


def test_imf_inference_model_is_exported_too(tmp_path, cli, digits):
    """IMF: `raykd export` also writes its deployed model (inference.onnx), rebuilt from the student and the
    method's modules and checked against inference.safetensors; onnxruntime gives the recorded accuracy."""
    import onnxruntime as ort

    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    overrides = ["teachers.models=[{name: t, arch: cnn8, seed: 1}]", "cache.layers={}", "teachers.optim.epochs=3",
                 "method.name=imf", "distill.teachers=online", "distill.optim.epochs=2", "distill.student.arch=cnn4"]
    cfg = digits_cfg(str(tmp_path), *overrides)
    run_teachers(cfg)
    rec = run_distill(cfg)
    code, out, err = cli("export", "--student", rec["name"], f"run.out_dir={tmp_path}", "teachers.optim.epochs=3",
                         *overrides)
    assert code == 0, err
    path = os.path.join(tmp_path, "students", rec["name"], "inference.onnx")
    assert path in out
    pixels = (digits.test.images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    logits = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert (logits.argmax(1) == digits.test.labels).mean() == pytest.approx(rec["inference"]["test_acc"], abs=1e-9)
