import pytest
import torch

from raykd.pipeline.models.zoo import MODELS, build_model


@pytest.mark.parametrize("arch", MODELS.names())
@pytest.mark.parametrize("size, chans", [(8, 1), (28, 1), (32, 3)])
def test_declared_stage_shapes_match_forward(arch, size, chans):
    torch.manual_seed(0)
    model = build_model(arch, 7, chans).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        logits, stages = model.forward_stages(x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (2, 7)
    assert {k: tuple(v.shape[1:]) for k, v in stages.items()} == model.stage_shapes(size)
    assert list(stages) == model.stage_names


def test_reference_parameter_counts():
    # CIFAR-100 counts published with RepDistiller/mdistiller (3 input channels, 100 classes)
    assert abs(build_model("resnet32x4", 100, 3).num_params() / 1e6 - 7.43) < 0.01
    assert abs(build_model("resnet8x4", 100, 3).num_params() / 1e6 - 1.23) < 0.01
    assert abs(build_model("wrn_40_2", 100, 3).num_params() / 1e6 - 2.26) < 0.01
    assert abs(build_model("resnet56", 100, 3).num_params() / 1e6 - 0.86) < 0.01


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="unknown model 'vgg13'.*resnet8"):
        build_model("vgg13", 10, 3)
