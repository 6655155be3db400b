"""Models: the zoo (CIFAR-style ResNets and WRNs in RepDistiller/mdistiller shapes, a small CNN family)
and, through the model sources of pipeline/models/sources.py, any torchvision or timm classification model
(`torchvision:<name>`, `timm:<name>`) and a user's own (`<module.path>:<factory>`).

Every model has `forward_stages(x) -> (logits, {stage: map})`, the one way FEED, IMF, the cache writer
and the online path get features, `stage_shapes(image_size)` ((C, H, W) of each stage) and
`stage_names`. Zoo models return their stages from their own forward and derive the shapes from the
architecture alone; a source's models are wrapped (`sources.TappedModel`: forward hooks on module
paths; timm's through its own intermediate-feature API), their shapes from one forward of a blank image.
"""
from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raykd.pipeline.core.registry import Registry

MODELS: Registry = Registry("model")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A teacher's own input (its spec's `image_size`, `mean`, `std`): the data set's normalised images
    (`data_mean`, `data_std`) brought back to [0, 1], resized to `image_size` (torchvision's antialiased
    resize) and normalised with the teacher's `mean`/`std` (the data set's when not given). Three-value
    statistics on one-channel data repeat the channel first. Applied at the start of `forward_stages`,
    so training, evaluation, the cache actors and online teachers all see the same input."""

    data_mean: tuple
    data_std: tuple
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None

    @classmethod
    def of(cls, spec: dict | None, data_mean, data_std) -> "Preprocess | None":
        """From a teacher spec's or record's {image_size, mean, std} (None when none is set)."""
        spec = {k: v for k, v in (spec or {}).items() if k in ("image_size", "mean", "std") and v is not None}
        if not spec:
            return None
        return cls(tuple(data_mean), tuple(data_std), spec.get("image_size"),
                   tuple(spec["mean"]) if "mean" in spec else None, tuple(spec["std"]) if "std" in spec else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def col(v):
            return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

        x = x * col(self.data_std) + col(self.data_mean)
        if self.mean is not None and len(self.mean) == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            from torchvision.transforms.v2.functional import resize

            x = resize(x, [self.image_size, self.image_size], antialias=True)
        if self.mean is not None:
            return (x - col(self.mean)) / col(self.std)
        return (x - col(self.data_mean)) / col(self.data_std)


def record_preprocess(rec: dict) -> "Preprocess | None":
    """The teacher's own input (size, normalisation) from its record or manifest entry, or None."""
    p = rec.get("preprocess")
    return Preprocess.of(p, p["data_mean"], p["data_std"]) if p else None


def _down(h: int) -> int:
    """Spatial size after a 3x3 conv with stride 2 and padding 1."""
    return (h - 1) // 2 + 1


class ZooModel(nn.Module, metaclass=ABCMeta):
    """Base: `self.stages` (an ordered ModuleDict run in sequence), then global average pool + `self.fc`."""

    stages: nn.ModuleDict
    fc: nn.Linear
    preprocess: Preprocess | None = None

    def __init__(self, num_classes: int, in_chans: int):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans

    @abstractmethod
    def _stage_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each stage for a square input of `image_size`, derived from the architecture."""

    def stage_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """Of the data set's `image_size`, or of the model's own input size (`preprocess.image_size`)."""
        return self._stage_shapes(self.preprocess.image_size or image_size if self.preprocess else image_size)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.preprocess is not None:
            x = self.preprocess(x)
        out = {}
        for name, mod in self.stages.items():
            x = mod(x)
            out[name] = x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _cifar_stage_shapes(w: tuple[int, ...], h: int) -> dict[str, tuple[int, int, int]]:
    """stem and stage1 at full size, stage2 and stage3 each halve it (stride-2 first block)."""
    return {"stem": (w[0], h, h), "stage1": (w[1], h, h), "stage2": (w[2], _down(h), _down(h)),
            "stage3": (w[3], _down(_down(h)), _down(_down(h)))}


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet (post-activation basic blocks, depth = 6n + 2)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout))
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNetCifar(ZooModel):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_chans: int):
        super().__init__(num_classes, in_chans)
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n + 2"
        n = (depth - 2) // 6
        self.widths = widths

        def group(cin, cout, stride):
            return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

        self.stages = nn.ModuleDict({
            "stem": nn.Sequential(*_conv_bn(in_chans, widths[0]), nn.ReLU(inplace=True)),
            "stage1": group(widths[0], widths[1], 1),
            "stage2": group(widths[1], widths[2], 2),
            "stage3": group(widths[2], widths[3], 2),
        })
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    def _stage_shapes(self, image_size: int):
        return _cifar_stage_shapes(self.widths, image_size)


# --------------------------------------------------------------------------------------------------
# Wide ResNet (pre-activation, depth = 6n + 4)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.short(o) if self.short is not None else x)


class WideResNet(ZooModel):
    def __init__(self, depth: int, k: int, num_classes: int, in_chans: int):
        super().__init__(num_classes, in_chans)
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n + 4"
        n = (depth - 4) // 6
        self.widths = (16, 16 * k, 32 * k, 64 * k)
        w = self.widths

        def group(cin, cout, stride):
            return [PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]

        self.stages = nn.ModuleDict({
            "stem": nn.Conv2d(in_chans, w[0], 3, 1, 1, bias=False),
            "stage1": nn.Sequential(*group(w[0], w[1], 1)),
            "stage2": nn.Sequential(*group(w[1], w[2], 2)),
            # The final BN-ReLU belongs to the last stage, so its map is the activated one the head pools.
            "stage3": nn.Sequential(*group(w[2], w[3], 2), nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True)),
        })
        self.fc = nn.Linear(w[3], num_classes)
        _init(self)

    def _stage_shapes(self, image_size: int):
        return _cifar_stage_shapes(self.widths, image_size)


# --------------------------------------------------------------------------------------------------
# Small CNN: [conv-BN-ReLU-maxpool] x2, conv-BN-ReLU, GAP, linear; for 8x8 to 28x28 inputs.


class SmallCNN(ZooModel):
    def __init__(self, width: int, num_classes: int, in_chans: int):
        super().__init__(num_classes, in_chans)
        self.widths = (width, 2 * width, 4 * width)
        w = self.widths
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(*_conv_bn(in_chans, w[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
            "stage2": nn.Sequential(*_conv_bn(w[0], w[1]), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
            "stage3": nn.Sequential(*_conv_bn(w[1], w[2]), nn.ReLU(inplace=True)),
        })
        self.fc = nn.Linear(w[2], num_classes)
        _init(self)

    def _stage_shapes(self, image_size: int):
        w, h = self.widths, image_size
        return {"stage1": (w[0], h // 2, h // 2), "stage2": (w[1], h // 4, h // 4), "stage3": (w[2], h // 4, h // 4)}


# --------------------------------------------------------------------------------------------------
# registry


def _reg(name: str, fn: Callable[[int, int], ZooModel]) -> None:
    MODELS.register(name)(fn)


for _d in (8, 14, 20, 32, 56):
    _reg(f"resnet{_d}", lambda nc, ic, d=_d: ResNetCifar(d, (16, 16, 32, 64), nc, ic))
for _d in (8, 32):
    _reg(f"resnet{_d}x4", lambda nc, ic, d=_d: ResNetCifar(d, (32, 64, 128, 256), nc, ic))
for _d, _k in ((16, 2), (40, 1), (40, 2)):
    _reg(f"wrn_{_d}_{_k}", lambda nc, ic, d=_d, k=_k: WideResNet(d, k, nc, ic))
for _w in (4, 8, 16, 32):
    _reg(f"cnn{_w}", lambda nc, ic, w=_w: SmallCNN(w, nc, ic))


# --------------------------------------------------------------------------------------------------
# every arch string: a zoo name, or `<scheme>:<name>` of a model source (pipeline/models/sources.py)


def check_arch(arch: str) -> None:
    """ValueError naming what is wrong with `arch` (a zoo name, or a model source's `<scheme>:<name>`)."""
    from raykd.pipeline.models.sources import source_of

    found = source_of(arch)
    if found is None:
        MODELS.check(arch)
    else:
        src, name = found
        src.check(name)


def build_model(arch: str, num_classes: int, in_chans: int, preprocess: Preprocess | None = None) -> nn.Module:
    """A zoo model, or a model source's (`torchvision:<name>`, `timm:<name>`, `module.path:factory`: built
    untrained with `num_classes` outputs, weights from a teacher's `checkpoint`, wrapped as a raykd model
    with stage taps). `preprocess`: a teacher's own input size and normalisation, applied first by
    `forward_stages`."""
    from raykd.pipeline.models.sources import source_of

    found = source_of(arch)
    if found is None:
        model = MODELS.get(arch)(num_classes, in_chans)
    else:
        src, name = found
        model = src.build(name, num_classes, in_chans)
    if preprocess is not None:
        model.preprocess = preprocess
    return model
