"""Model sources: the `<scheme>:<name>` forms of `arch` (and of a teacher's `checkpoint`) besides the zoo's
plain names. Each scheme is one registration of a `ModelSource` in `SOURCES`: how a name is checked,
how the model is built (untrained, `num_classes` outputs, wrapped as a raykd model whose stages are
tapped), where a `<scheme>:<ref>` checkpoint is on this machine (never downloaded), and which modules a
worker imports first.

- `torchvision:<name>`: any torchvision classification model; stages by forward hooks (`TappedModel`);
  checkpoints `torchvision:<Weights>.<NAME>` from the torch hub cache.
- `timm:<name>`: any timm model (`pip install 'raykd[timm]'`); stages from timm's own
  `forward_intermediates` (named by its `feature_info` modules); checkpoints `timm:<name>` from the
  Hugging Face cache (the model's pretrained tag's `hf_hub_id`).
- `module.path:factory`: a user's factory, called as factory(num_classes=, in_chans=); any scheme
  that is not registered is read so, and its module is imported in every worker.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from raykd.pipeline.core.errors import CheckpointError, ConfigError
from raykd.pipeline.core.registry import Registry

if TYPE_CHECKING:
    from raykd.pipeline.models.zoo import Preprocess


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One scheme of `<scheme>:<name>` arch strings."""

    check: Callable[[str], None]  # name -> None, or ValueError saying what is wrong
    build: Callable[[str, int, int], nn.Module]  # (name, num_classes, in_chans) -> a raykd model
    checkpoint: Callable[[str], str] | None = None  # `<scheme>:<ref>` checkpoint -> its local file
    imports: Callable[[str], list[str]] = lambda name: []  # modules a worker imports before building it


SOURCES: Registry = Registry("model source")


def source_of(arch: str) -> tuple[ModelSource, str] | None:
    """(its source, the name after the scheme) of an arch string; None for a zoo name. An unregistered
    prefix is a user's `module.path:factory` (the whole string is its name)."""
    if ":" not in arch:
        return None
    scheme, _, name = arch.partition(":")
    if scheme in SOURCES:
        return SOURCES.get(scheme), name
    return USER_SOURCE, arch


def resolve_checkpoint(ref: str) -> str:
    """A teacher checkpoint's file: `ref` itself, or for `<scheme>:<ref>` of a source that keeps weights
    (torchvision:, timm:) the file in that source's local cache. raykd never downloads."""
    scheme, sep, name = ref.partition(":")
    src = SOURCES.get(scheme) if sep and scheme in SOURCES else None
    return src.checkpoint(name) if src is not None and src.checkpoint is not None else ref


def is_source_ref(ref: str) -> bool:
    """Whether a checkpoint reference names a source's cached weights rather than a file."""
    scheme, sep, _ = ref.partition(":")
    return bool(sep) and scheme in SOURCES and SOURCES.get(scheme).checkpoint is not None


def worker_imports(arch: str) -> list[str]:
    found = source_of(arch)
    return found[0].imports(found[1]) if found else []


class TappedModel(nn.Module):
    """Any classifier as a raykd model: logits from its own forward, stages from forward hooks on its
    submodules, named by module path (`layer3`, `features.8`), as torchvision's `get_graph_node_names`
    would name them. Hooks rather than torch.fx (`torchvision.models.feature_extraction`): they work on
    models FX cannot trace (data-dependent control flow in a user's forward) and cost nothing when no
    stage is read.

    Stages: the model's own `raykd_stages` (a list of module paths) when it has one, else its top-level
    children that hold parameters and no `nn.Linear` (the trunk, not the head: `conv1`, `bn1`, `layer1`..
    `layer4` of a ResNet), or, when that is a single `nn.Sequential` (VGG, MobileNet, EfficientNet,
    ConvNeXt: `features`), its children (`features.0`, ...). The parameters are `net.<its own keys>`;
    a foreign checkpoint loads into `self.net` (`raykd.pipeline.models.checkpoints.load_foreign`).
    `grey_to_rgb`: the net takes 3 channels and the data have 1 (torchvision models): the channel is
    repeated (no parameters)."""

    preprocess: Preprocess | None = None

    def __init__(self, net: nn.Module, num_classes: int, in_chans: int, grey_to_rgb: bool = False):
        super().__init__()
        self.net, self.num_classes, self.in_chans, self.grey_to_rgb = net, num_classes, in_chans, grey_to_rgb
        modules = dict(net.named_modules())  # looked up once: forward_stages runs on every training step
        own = getattr(net, "raykd_stages", None)
        if own is not None:
            unknown = [n for n in own if n not in modules or not n]
            if unknown:
                raise ValueError(f"raykd_stages {unknown} are not module paths of {type(net).__name__}")
            self._stages = list(own)
        else:
            self._stages = _trunk(net)
        self._taps = [(n, modules[n]) for n in self._stages]

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.preprocess is not None:
            x = self.preprocess(x)
        out: dict[str, torch.Tensor] = {}
        hooks = [mod.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n, mod in self._taps]
        try:
            logits = self.net(x.expand(-1, 3, -1, -1) if self.grey_to_rgb and x.shape[1] == 1 else x)
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(logits, torch.Tensor):  # GoogLeNet/Inception in training: (logits, aux...)
            logits = logits.logits if hasattr(logits, "logits") else logits[0]
        return logits, {n: out[n] for n in self._stages}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]

    @property
    def stage_names(self) -> list[str]:
        return list(self._stages)

    def stage_shapes(self, image_size: int) -> dict[str, tuple[int, ...]]:
        """From one forward of a blank image (eval mode, no grad; the mode is restored)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                p = next(self.parameters(), None)
                x = torch.zeros(1, self.in_chans, image_size, image_size, device=p.device if p is not None else None)
                _, maps = self.forward_stages(x)
        finally:
            self.train(was)
        return {n: tuple(m.shape[1:]) for n, m in maps.items()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _trunk(net: nn.Module) -> list[str]:
    def has(m, kind):
        return any(isinstance(c, kind) for c in m.modules())

    trunk = [(n, m) for n, m in net.named_children()
             if any(True for _ in m.parameters()) and not has(m, nn.Linear)]
    if len(trunk) == 1 and isinstance(trunk[0][1], nn.Sequential):
        return [f"{trunk[0][0]}.{n}" for n, _ in trunk[0][1].named_children()]
    return [n for n, _ in trunk]



# --------------------------------------------------------------------------------------------------
# torchvision:


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _tv_check(name: str) -> None:
    if name not in torchvision_names():
        raise ValueError(f"'torchvision:{name}': torchvision has no classification model {name!r} "
                         f"(torchvision.models.list_models(): {', '.join(torchvision_names()[:8])}, ...)")


def _tv_build(name: str, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision.models as tvm

    _tv_check(name)
    net = tvm.get_model(name, weights=None, num_classes=num_classes)
    return TappedModel(net, num_classes, in_chans, grey_to_rgb=in_chans == 1)


def _tv_checkpoint(name: str) -> str:
    """<torch.hub.get_dir()>/checkpoints/<file> of `torchvision:<Weights>.<NAME>` (e.g. ResNet18_Weights.IMAGENET1K_V1)."""
    import torchvision.models as tvm

    try:
        w = tvm.get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint torchvision:{name}: torchvision has no weights {name!r} ({e})") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint torchvision:{name}: {path} is not in the torch cache and raykd does not download; on a "
            f"machine with internet run `python -c \"import torchvision; torchvision.models.get_weight('{name}')"
            f".get_state_dict()\"` and copy the file there (or give the file's path as the checkpoint)")
    return path


SOURCES.register("torchvision")(ModelSource(_tv_check, _tv_build, _tv_checkpoint))


# --------------------------------------------------------------------------------------------------
# timm:


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm: models are built by the timm package, which is not installed: "
                         "pip install 'raykd[timm]'") from None
    return timm


class TimmModel(TappedModel):
    """A timm model as a raykd model: stages from timm's own intermediate-feature API
    (`forward_intermediates`, one map per `feature_info` entry, named by its module), the logits from
    `forward_head` of its final features: the model's own forward, split."""

    def __init__(self, net: nn.Module, num_classes: int, in_chans: int):
        net.raykd_stages = [f["module"] for f in net.feature_info]
        super().__init__(net, num_classes, in_chans)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.preprocess is not None:
            x = self.preprocess(x)
        final, maps = self.net.forward_intermediates(x)
        return self.net.forward_head(final), dict(zip(self._stages, maps))


def _timm_check(name: str) -> None:
    if not _timm().is_model(name):
        raise ValueError(f"'timm:{name}': timm has no model {name!r} (timm.list_models() lists them)")


def _timm_build(name: str, num_classes: int, in_chans: int) -> nn.Module:
    _timm_check(name)
    net = _timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if hasattr(net, "forward_intermediates") and getattr(net, "feature_info", None):
        return TimmModel(net, num_classes, in_chans)
    return TappedModel(net, num_classes, in_chans)  # a model without timm's feature API: hooks


def _timm_checkpoint(name: str) -> str:
    """The weights of `timm:<name>[.<tag>]` in the Hugging Face cache (HF_HUB_CACHE), as timm would load them."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(f"checkpoint timm:{name}: timm knows no weights on the Hugging Face hub for {name!r}")
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(path, str):
            return path
    raise CheckpointError(
        f"checkpoint timm:{name}: {cfg.hf_hub_id} is not in the Hugging Face cache and raykd does not download; "
        f"on a machine with internet run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
        "and copy the cache (HF_HUB_CACHE) here, or give the weights file's path as the checkpoint")


SOURCES.register("timm")(ModelSource(_timm_check, _timm_build, _timm_checkpoint, lambda name: ["timm"]))


# --------------------------------------------------------------------------------------------------
# module.path:factory (every other prefix)


def _factory(arch: str) -> Callable:
    """The factory of `module.path:factory`, checked: it must be callable as factory(num_classes=, in_chans=)."""
    import inspect

    from raykd.pipeline.models.plugins import import_user_module

    module, _, attr = arch.rpartition(":")
    if not module or not attr:
        raise ValueError(f"{arch!r}: a user model is given as module.path:factory")
    mod = import_user_module(module, repr(arch))
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"{arch!r}: {module} has no callable {attr!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: calling it tells
        return fn
    try:
        sig.bind(num_classes=10, in_chans=3)
    except TypeError as e:
        raise ValueError(f"{arch!r} is not a model factory: raykd calls it as {attr}(num_classes=, in_chans=) and "
                         f"that call does not fit its signature {attr}{sig} ({e})") from None
    return fn




def _user_check(arch: str) -> None:
    _factory(arch)


def _user_build(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    from raykd.pipeline.models.zoo import ZooModel

    net = _factory(arch)(num_classes=num_classes, in_chans=in_chans)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"arch {arch}: {arch.rpartition(':')[2]}(num_classes={num_classes}, in_chans={in_chans}) "
                          f"returned a {type(net).__name__}, not a torch.nn.Module")
    return net if isinstance(net, ZooModel) else TappedModel(net, num_classes, in_chans)


USER_SOURCE = ModelSource(_user_check, _user_build, imports=lambda arch: [arch.rpartition(":")[0]])
