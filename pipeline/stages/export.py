"""`raykd export`: a trained student as an ONNX model that takes pixels and gives logits.

The graph includes the data set's normalisation: its input `pixels` is float32 (batch, C, H, W) in
[0, 1] (a uint8 image divided by 255), its output `logits` (batch, classes); the batch size is dynamic.
torch's ONNX exporter (torch.export + onnxscript) writes it; onnxruntime, when installed, checks it
against the PyTorch model on random pixels before the file is kept.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from raykd.pipeline.core.errors import CheckpointError, RaykdError


class Normalized(nn.Module):
    """pixels in [0, 1] -> the model's normalised input -> logits."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def load_student(cfg, name: str):
    """(the finished student `name` as an nn.Module in eval mode, its record, its directory, the data splits),
    its weights checked against their sha256."""
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.models.checkpoints import load_into, load_state_dict
    from raykd.pipeline.models.zoo import build_model
    from raykd.pipeline.stages.distill import student_record

    sdir = os.path.join(os.path.abspath(cfg.run.out_dir), "students", name)
    rec = student_record(sdir).read()
    if rec is None:
        raise RaykdError(f"no finished student {name!r} under {sdir} (raykd distill writes student.json there)")
    splits = load_splits(cfg.data)  # its classes, channels, size and normalisation
    model = build_model(rec["arch"], splits.num_classes, splits.in_chans)
    path = os.path.join(sdir, "student.safetensors")
    try:
        load_into(model, load_state_dict(path, rec["files"]["student.safetensors"]), path, rec["arch"])
    except CheckpointError as e:
        raise CheckpointError(f"student {name!r}: {e} (was it trained on this config's data set?)") from None
    return model.eval(), rec, sdir, splits


def export_student(cfg, name: str, out: str | None = None, check: bool = True) -> dict:
    """Write <out_dir>/students/<name>/student.onnx (or `out`), and for IMF its deployed model as
    inference.onnx beside it; returns {path, max_abs_diff or None, inputs[, inference]}."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise RaykdError("raykd export needs onnx and onnxscript: pip install 'raykd[export]'") from None
    model, rec, sdir, splits = load_student(cfg, name)
    net = Normalized(model.eval(), splits.mean, splits.std).eval()
    x = torch.rand(2, splits.in_chans, splits.image_size, splits.image_size)
    out = out or os.path.join(sdir, "student.onnx")
    res = {**_write(net, x, out, name, check),
           "inputs": {"pixels": ["batch", splits.in_chans, splits.image_size, splits.image_size]}}
    if "inference" in rec:  # IMF: its deployed model too, rebuilt from the student and the method's modules
        inf = _imf_inference(cfg, rec, sdir, model)
        res["inference"] = _write(Normalized(inf, splits.mean, splits.std).eval(), x,
                                  os.path.join(os.path.dirname(out), "inference.onnx"), name, check)
    return res


def _imf_inference(cfg, rec: dict, sdir: str, student: nn.Module) -> nn.Module:
    from raykd.methods.base import MethodContext, build_method
    from raykd.methods.imf import IMFInference
    from raykd.pipeline.models.checkpoints import load_state_dict

    if "method_ctx" not in rec:
        raise RaykdError(f"student {rec['name']!r} was trained before raykd kept its method context; retrain it to "
                         "export its IMF inference model")
    method = build_method(cfg.method, MethodContext(**rec["method_ctx"]))
    path = os.path.join(sdir, "method.safetensors")
    method.load_state_dict(load_state_dict(path, rec["files"]["method.safetensors"]))
    inf = IMFInference(student, method).eval()
    saved = load_state_dict(os.path.join(sdir, "inference.safetensors"), rec["files"]["inference.safetensors"])
    if any(not torch.equal(v, saved[k]) for k, v in inf.state_dict().items()):
        raise RaykdError(f"student {rec['name']!r}: the rebuilt IMF inference model differs from inference.safetensors "
                         "(is this the config it was trained with?)")
    return inf


def _write(net: nn.Module, x: torch.Tensor, out: str, name: str, check: bool) -> dict:
    from raykd.pipeline.core.records import atomic_path

    diff = None
    with atomic_path(out, suffix=".onnx") as tmp:  # nothing at `out` unless the export is whole and checked
        torch.onnx.export(net, (x,), tmp, input_names=["pixels"], output_names=["logits"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, verbose=False)
        if check:
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                probe = torch.rand(5, *x.shape[1:])
                got = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"]).run(None, {"pixels": probe.numpy()})[0]
                with torch.no_grad():
                    want = net(probe).numpy()
                diff = float(np.abs(got - want).max())
                if not diff <= 1e-3 * max(1.0, float(np.abs(want).max())):
                    raise RaykdError(f"the ONNX export of {name!r} disagrees with PyTorch (max |diff| {diff:.3g}); "
                                     "nothing written")
    return {"path": out, "max_abs_diff": diff}
