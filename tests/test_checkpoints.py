import os
import pickle

import pytest
import torch

from raykd.pipeline.core.errors import CheckpointError
from raykd.pipeline.core.records import sha256_file
from raykd.pipeline.models.checkpoints import load_into, load_state_dict, save_state_dict
from raykd.pipeline.models.zoo import build_model


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    path = str(tmp_path / "m.safetensors")
    sha = save_state_dict(model.state_dict(), path)
    assert sha == sha256_file(path) and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    other = build_model("resnet8", 10, 1)
    load_into(other, load_state_dict(path, sha), path, "resnet8")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_torch_save_file_loads_weights_only(tmp_path):
    model = build_model("cnn4", 10, 1)
    path = str(tmp_path / "m.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    state = load_state_dict(path)
    assert set(state) == set(model.state_dict())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled Python objects .*weights_only=True") as e:
        load_state_dict(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400  # one line, not torch's page of advice


def test_tampered_file_is_detected(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sha = save_state_dict(build_model("cnn4", 10, 1).state_dict(), path)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_state_dict(path, sha)


def test_truncated_and_missing(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_state_dict(build_model("cnn4", 10, 1).state_dict(), path)
    open(path, "r+b").truncate(100)
    with pytest.raises(CheckpointError, match="not readable"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(str(tmp_path / "nope.safetensors"))


def test_wrong_arch_names_both(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_state_dict(build_model("cnn4", 10, 1).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit arch 'cnn8'"):
        load_into(build_model("cnn8", 10, 1), load_state_dict(path), path, "cnn8")


def test_only_safe_loaders_in_the_code():
    """Every YAML read is safe_load, every torch.load is weights_only=True (checkpoints otherwise safetensors)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder in ("pipeline", "methods", "bench"):
        for dirpath, dirs, files in os.walk(os.path.join(root, folder)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # bench/.peers: a peer's installed code, not ours
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for i, line in enumerate(open(path), 1):
                    if re.search(r"yaml\.(unsafe_)?load\(|yaml\.full_load|yaml\.Loader|pickle\.loads?\(", line) or (
                            "torch.load(" in line and "weights_only=True" not in line):
                        offenders.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()}")
    assert not offenders, offenders
    import yaml

    from raykd.pipeline.core import yamlio

    assert yamlio._StrictLoader.__mro__[1] is yaml.SafeLoader  # the config reader: SafeLoader's tags only
