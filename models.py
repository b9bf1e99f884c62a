"""EfficientNet-B0 and B2, written by hand in plain PyTorch.

The HMTL paper (Pourmirzaei et al., arXiv 2105.06421) trains EfficientNet-B0 and B2 encoders
from scratch or from ImageNet. This file is the whole backbone: read it top to bottom.

EfficientNet (Tan & Le, ICML 2019) is a stack of MBConv blocks (MobileNetV2's inverted
residual + squeeze-and-excitation) whose stages are given by one table for B0; bigger variants
scale the table's widths and depths by two numbers (section 3.3 of that paper).

The module names, parameter names and shapes are exactly torchvision's, so
`model.load_state_dict(torchvision_model.state_dict(), strict=True)` works and the test suite
proves the logits agree to 1e-5. Nothing here imports torchvision.

Entry points: `efficientnet_b0(num_classes)`, `efficientnet_b2(num_classes)`, and
`load_imagenet_weights(model)`. For the HMTL heads a model also gives
`forward_features(x)` (the last feature map, before pooling), `pool(feature_map)` (the pooled
feature) and `num_features` (its width: 1280 for B0, 1408 for B2).
"""

import math
import os
import urllib.error

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# The B0 table (Tan & Le 2019, Table 1): one row per stage.
#   expand: channel expansion of the MBConv's 1x1 conv;  kernel: depthwise kernel size;
#   stride: of the first block in the stage;  in/out: channels;  repeats: blocks in the stage.
B0_STAGES = [
    # expand, kernel, stride, in, out, repeats
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]

# Compound scaling coefficients: (width multiplier, depth multiplier, dropout before the
# classifier), B0 and B2 as published. Their native resolutions are 224 and 260 px; any size
# runs (the network ends in a global pool).
VARIANTS = {
    "b0": dict(width=1.0, depth=1.0, dropout=0.2),
    "b2": dict(width=1.1, depth=1.2, dropout=0.3),
}

STOCHASTIC_DEPTH = 0.2  # drop probability reached by the last block, rising linearly from 0

# The TensorFlow EfficientNets (timm's `tf_efficientnet_*`, and so every HSEmotion model) differ
# from torchvision's in two ways that change the outputs for the same weights: BatchNorm eps
# 1e-3, and "SAME" padding on the five stride-2 convs. `efficientnet(arch, **TF_VARIANT)`.
TF_VARIANT = dict(bn_eps=1e-3, same_padding=True)


# ----------------------------------------------------------------------------------------------
# The two scaling rules.

def scale_width(channels, width_mult, divisor=8):
    """Channels times the width multiplier, rounded to a multiple of 8 (hardware-friendly),
    but never more than 10 % below the exact target."""
    target = channels * width_mult
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return rounded


def scale_depth(repeats, depth_mult):
    """Blocks in a stage times the depth multiplier, rounded up."""
    return int(math.ceil(repeats * depth_mult))


# ----------------------------------------------------------------------------------------------
# Building blocks. Module names mirror torchvision's so that state_dict keys match.

class BatchNormSiLU(torch.autograd.Function):
    """SiLU(BatchNorm(x)) that keeps only x for backward.

    Autograd would keep three tensors per conv-BN-SiLU: the conv output (for BN's gradient),
    the BN output (for SiLU's) and the SiLU output (for the next conv's). The BN output is a
    per-channel affine map of the conv output, so backward recomputes it in one pass instead
    of storing it: about a third less activation memory, with identical values and gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                  training, momentum, eps)
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return F.silu(y, inplace=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, running_mean, running_var, mean, invstd = ctx.saved_tensors
        if not ctx.training:  # eval-mode BN normalises with the running statistics
            mean, invstd = running_mean, (running_var + ctx.eps).rsqrt()
        scale = invstd * weight
        shift = bias - mean * scale
        y = torch.addcmul(shift[:, None, None], x, scale[:, None, None]).to(x.dtype)
        grad_y = torch.ops.aten.silu_backward(grad_out, y)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, running_mean, running_var, mean if ctx.training else None,
            invstd if ctx.training else None, ctx.training, ctx.eps, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_w, grad_b, None, None, None, None, None


class Conv2dSame(nn.Conv2d):
    """A strided conv with TensorFlow's "SAME" padding, for the `tf_` EfficientNets: the output
    is ceil(input / stride) and the padding that takes goes half before, the rest after. On an
    even input a 3×3 stride-2 conv pads 0 before and 1 after, where PyTorch pads 1 and 1: the
    same weights would see every feature shifted by a pixel."""

    def forward(self, x):
        pads = []
        for size, kernel, stride in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                                     (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad: width's (before, after), then height's
        return super().forward(F.pad(x, pads))


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> SiLU (or no activation). Children "0", "1", as in
    torchvision's Conv2dNormActivation. `bn_eps` and `same_padding` (for strided convs) are
    the two differences of TensorFlow's EfficientNets (TF_VARIANT)."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, activation=True,
                 memory_efficient=False, bn_eps=1e-5, same_padding=False):
        if same_padding and stride > 1:
            conv = Conv2dSame(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=False)
        else:
            conv = nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        layers = [conv, nn.BatchNorm2d(out_ch, eps=bn_eps)]
        if activation:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)
        self.activation = activation
        self.memory_efficient = memory_efficient

    def forward(self, x):
        x = self[0](x)
        if not self.activation:
            return self[1](x)
        if not (self.memory_efficient and torch.is_grad_enabled()):
            return self[2](self[1](x))
        bn = self[1]
        if bn.training:
            bn.num_batches_tracked.add_(1)
        return BatchNormSiLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                   bn.training, bn.momentum, bn.eps)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): global average -> reduce -> SiLU -> expand -> sigmoid
    -> rescale the channels. The two 1x1 convs are kept as Conv2d parameters (torchvision's
    keys and shapes) but applied as matrix products on the pooled (N, C) vector, which skips
    the 4-D convolution machinery for a 1x1 spatial map."""

    def __init__(self, channels, squeeze_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3))
        scale = F.silu(F.linear(scale, self.fc1.weight.flatten(1), self.fc1.bias))
        scale = torch.sigmoid(F.linear(scale, self.fc2.weight.flatten(1), self.fc2.bias))
        return x * scale[:, :, None, None]


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> squeeze-excite -> 1x1 project
    (no activation), plus the identity shortcut when shapes allow. The SE bottleneck is sized
    from the block's *input* channels (a quarter of them), as in the reference."""

    def __init__(self, in_ch, out_ch, expand, kernel, stride, drop_prob, memory_efficient=False,
                 bn_eps=1e-5, same_padding=False):
        super().__init__()
        hidden = scale_width(in_ch, expand)
        layers = []
        if hidden != in_ch:
            layers.append(ConvBNAct(in_ch, hidden, 1, memory_efficient=memory_efficient,
                                    bn_eps=bn_eps))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden,
                      memory_efficient=memory_efficient, bn_eps=bn_eps, same_padding=same_padding),
            SqueezeExcite(hidden, max(1, in_ch // 4)),
            ConvBNAct(hidden, out_ch, 1, activation=False, bn_eps=bn_eps),
        ]
        self.block = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.drop_prob = drop_prob

    def forward(self, x):
        out = self.block(x)
        if not self.use_shortcut:
            return out
        if self.training and self.drop_prob > 0:
            # Stochastic depth (Huang et al. 2016), per sample: drop the residual branch with
            # probability p and scale survivors by 1/(1-p), fused with the shortcut addition.
            keep = 1.0 - self.drop_prob
            mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
            mask = mask.bernoulli_(keep).div_(keep)
            return torch.addcmul(x, out, mask)
        return out + x


class EfficientNet(nn.Module):
    """Stem conv -> the scaled stages of MBConv blocks -> 1x1 head conv -> average pool ->
    dropout -> linear classifier."""

    def __init__(self, width, depth, dropout, num_classes=1000, stochastic_depth=STOCHASTIC_DEPTH,
                 memory_efficient=False, zero_init_residual=False, bn_eps=1e-5,
                 same_padding=False):
        super().__init__()
        stages = [(e, k, s, scale_width(i, width), scale_width(o, width), scale_depth(n, depth))
                  for e, k, s, i, o, n in B0_STAGES]
        total_blocks = sum(n for *_, n in stages)
        tf = dict(bn_eps=bn_eps, same_padding=same_padding)

        layers = [ConvBNAct(3, stages[0][3], 3, stride=2, memory_efficient=memory_efficient, **tf)]
        block_index = 0
        for expand, kernel, stride, in_ch, out_ch, repeats in stages:
            blocks = []
            for r in range(repeats):
                # Only the stage's first block changes stride and width.
                drop_prob = stochastic_depth * block_index / total_blocks
                blocks.append(MBConv(in_ch if r == 0 else out_ch, out_ch, expand, kernel,
                                     stride if r == 0 else 1, drop_prob, memory_efficient, **tf))
                block_index += 1
            layers.append(nn.Sequential(*blocks))
        self.num_features = 4 * stages[-1][4]
        layers.append(ConvBNAct(stages[-1][4], self.num_features, 1,
                                memory_efficient=memory_efficient, bn_eps=bn_eps))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True),
                                        nn.Linear(self.num_features, num_classes))
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual=False):
        # The reference initialisation: He-normal (fan-out) convs, unit BN, small uniform linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017 (sec. 5.1), as torchvision's ResNet option of the same name: the
            # last BN of every residual block starts at zero, so each block starts as the
            # identity. Not the reference init; HMTL uses it from scratch (hmtl.py says why).
            for m in self.modules():
                if isinstance(m, MBConv) and m.use_shortcut:
                    nn.init.zeros_(m.block[-1][1].weight)

    def forward_features(self, x):
        """The last feature map, (N, num_features, H/32, W/32): what decoders and heads use."""
        return self.features(x)

    def pool(self, feature_map):
        """Global average pool: the (N, num_features) embedding every task head reads."""
        return feature_map.mean((2, 3))

    def forward(self, x):
        return self.classifier(self.pool(self.forward_features(x)))


def efficientnet(arch, num_classes=1000, **kwargs):
    """`arch` is "b0" or "b2"; keyword arguments override the variant's defaults."""
    if arch not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {arch!r}; choose from {sorted(VARIANTS)}")
    return EfficientNet(num_classes=num_classes, **{**VARIANTS[arch], **kwargs})


def efficientnet_b0(num_classes=1000, **kwargs):
    return efficientnet("b0", num_classes, **kwargs)


def efficientnet_b2(num_classes=1000, **kwargs):
    return efficientnet("b2", num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------
# ImageNet initialisation (the paper's first experiment compares it with training from
# scratch). These are torchvision's IMAGENET1K_V1 weights; since the parameter names match, the
# file loads as it is. Inputs must then be normalised with IMAGENET_MEAN / IMAGENET_STD.

IMAGENET_WEIGHTS = {
    "b0": "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
    "b2": "https://download.pytorch.org/models/efficientnet_b2_rwightman-c35c1473.pth",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.tensor(python_values, device="cuda") copies from the host and waits for the copy, at
# every call; so does indexing with a Python list. A training step makes none: each constant is
# made once per device and kept.
_DEVICE_CONSTANTS = {}


def device_constant(values, device, dtype=torch.float32):
    """torch.tensor(values, dtype, device), made once per (values, device, dtype). `values` is
    a tuple (nested tuples for more dimensions). Treat the result as read-only."""
    key = (values, torch.device(device), dtype)
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _DEVICE_CONSTANTS[key]


def per_channel(values, device):
    """A (1, C, 1, 1) device constant: made in that shape rather than viewed, so an exported
    program holds it as a whole tensor."""
    return device_constant((tuple(((v,),) for v in values),), device)


def normalize(pixels):
    """uint8 or [0, 255] float images (N, 3, H, W) -> ImageNet-normalised float: the input every
    model here is trained on, and the one ImageNet initialisation needs. The one place it is
    written: augmentation, evaluation, prediction and the exported files all call it."""
    mean = per_channel(IMAGENET_MEAN, pixels.device) * 255
    std = per_channel(IMAGENET_STD, pixels.device) * 255
    return (pixels.float() - mean) / std


def denormalize(images):
    """The inverse of normalize(): normalised images -> float pixels in [0, 255] (to look at)."""
    mean = per_channel(IMAGENET_MEAN, images.device) * 255
    std = per_channel(IMAGENET_STD, images.device) * 255
    return images * std + mean


def imagenet_weights_path(arch):
    """Where the weights file is looked for: torch's hub cache, the same place torchvision
    downloads it to (so a copy already fetched by torchvision is reused)."""
    filename = IMAGENET_WEIGHTS[arch].rsplit("/", 1)[1]
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_imagenet_weights(model, arch, path=None):
    """Load torchvision's ImageNet weights for `arch` into `model`, every parameter but the
    classifier, which stays freshly initialised for the task (unless the model is 1000-way).

    `path` overrides the file location. Without it, the hub cache is tried, then a download;
    if neither works, one RuntimeError line says which file to place where."""
    if arch not in IMAGENET_WEIGHTS:
        raise ValueError(f"no ImageNet weights for {arch!r}; choose from {sorted(IMAGENET_WEIGHTS)}")
    url = IMAGENET_WEIGHTS[arch]
    if path is None:
        path = imagenet_weights_path(arch)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, path, progress=False)
            except (urllib.error.URLError, OSError) as err:
                raise RuntimeError(f"cannot download ImageNet weights for EfficientNet-{arch.upper()} "
                                   f"({err.__class__.__name__}): place {url} at {path}") from None
    elif not os.path.exists(path):
        raise RuntimeError(f"ImageNet weights file {path} does not exist (expected {url})")

    state = torch.load(path, map_location="cpu", weights_only=True)
    return load_backbone_state(model, state, f"{path} is not an EfficientNet-{arch.upper()} state_dict")


def load_backbone_state(model, state, what):
    """Load a state_dict with this file's (torchvision's) key names into `model`: every tensor
    but the classifier's must be there, with its shape. The classifier is kept if its shape
    fits, else the model keeps its own (the task's head; a 1000-way ImageNet head, say).
    Otherwise a one-line RuntimeError: `what`, then what is missing, unexpected or misshapen."""
    own = model.state_dict()
    if state.get("classifier.1.weight", torch.empty(0)).shape != own["classifier.1.weight"].shape:
        state = {k: v for k, v in state.items() if k not in ("classifier.1.weight", "classifier.1.bias")}
    missing = [k for k in own if k not in state and not k.startswith("classifier.1.")]
    wrong = [k for k in state if k not in own or state[k].shape != own[k].shape]
    if missing or wrong:
        raise RuntimeError(f"{what}: {len(missing)} keys missing, {len(wrong)} unexpected or of "
                           f"another shape (first: {(missing + wrong)[0]})")
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------------------------
# Face-pretrained weights from timm (HSEmotion's EfficientNets are timm models). timm's and
# torchvision's EfficientNets have the same layers under other names; the map below renames
# them. In the first stage (no expansion) a block is depthwise -> SE -> pointwise; in the
# others, expand -> depthwise -> SE -> project.

TIMM_FIRST_STAGE = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1",
                    "se.conv_expand": "1.fc2", "conv_pw": "2.0", "bn2": "2.1"}
TIMM_BLOCK = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1",
              "se.conv_reduce": "2.fc1", "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}
TIMM_TOP = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": "features.8.0",
            "bn2": "features.8.1", "classifier": "classifier.1"}


def timm_key(key):
    """A timm EfficientNet state_dict key -> torchvision's (this file's), or None if unknown."""
    module, _, tensor = key.rpartition(".")
    if module in TIMM_TOP:
        return f"{TIMM_TOP[module]}.{tensor}"
    parts = module.split(".")
    if parts[0] != "blocks" or len(parts) < 4 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    stage, block, layer = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    renamed = (TIMM_FIRST_STAGE if stage == 0 else TIMM_BLOCK).get(layer)
    return f"features.{stage + 1}.{block}.block.{renamed}.{tensor}" if renamed else None


def read_state_dict(path):
    """Tensors of a state_dict file: a torch.save'd dict (read with weights_only=True, so no
    code runs) or a .safetensors file (timm's Hugging Face format; needs safetensors)."""
    if not os.path.exists(path):
        raise RuntimeError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise RuntimeError(".safetensors weights need the safetensors package: "
                               "pip install safetensors") from None
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled whole module, or not a torch file at all
        raise RuntimeError(f"{path} is not a plain state_dict ({err.__class__.__name__}); an "
                           f"HSEmotion file is a pickled module: convert it first with "
                           f"python eval.py convert-hsemotion") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_timm_weights(model, state):
    """Load a timm `efficientnet_b0/b2` or `tf_efficientnet_b0/b2*` state_dict (a dict or a
    file path) into `model`, through the key map. The classifier is kept if its shape matches,
    else left as it is (the task's head). A `tf_` state_dict needs a model built with
    TF_VARIANT: the weights would load either way, the features would not be the same."""
    if isinstance(state, (str, os.PathLike)):
        state = read_state_dict(os.fspath(state))
    renamed = {timm_key(key) or key: value for key, value in state.items()}  # unknown: unexpected
    return load_backbone_state(model, renamed, "not a timm EfficientNet state_dict of this size")
