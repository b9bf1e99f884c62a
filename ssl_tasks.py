"""The self-supervised pretext tasks of HMTL: puzzling and region-masking in-painting.

Pourmirzaei et al. (arXiv 2105.06421) train a facial task jointly with one of these on a shared
encoder. Everything here works on a whole batch on its device (the GPU in real runs): no
per-sample Python loop, nothing in the data loader.

Each pretext task is one module that the HMTL model is built from, with two methods:
  transform(images, landmarks, has_landmarks, generator) -> (transformed images, its target)
  loss(feature_map, images, target, encoder)             -> (loss, parts to log)
The parts include the task's own score, to see whether it is learned: the puzzle's
"positions_right" (chance 1/g^2), in-painting's "l1_vs_fill" (1.0: no better than the blank).

    Puzzle   shuffle the tiles of a g x g grid; predict where each tile came from
    Inpaint  blank out two facial parts; reconstruct them (masked L1 + perceptual loss)

Their pieces are small functions with their own docstrings, written to be copied on their own:
  puzzle / unpuzzle               shuffle the tiles of a g x g grid, and undo it
  PuzzleHead, puzzle_loss         predict, for each grid position, which tile sits there
  region_boxes, region_mask       facial-part boxes from 68 landmarks or the dataset's layout
  five_point_layout, median_layout  a layout from five points, or from many faces' landmarks
  mask_images                     blank out the masked regions
  InpaintDecoder, inpaint_loss    reconstruct the image; masked L1 + perceptual loss
"""

import torch
import torch.nn.functional as F
from torch import nn

from models import device_constant  # constants made once per device: no host sync per step


# ----------------------------------------------------------------------------------------------
# Puzzling (the official HMTL code): cut the image into a grid, shuffle the tiles with a
# uniformly random permutation per sample, and ask the network where each tile came from.


def permute_tiles(images, index, grid):
    """Rearrange the tiles of a g x g grid: output position i (row-major) receives input tile
    index[b, i]. images (N, C, H, W); index (N, g*g) long.

    When H or W is not a multiple of g, the grid covers the top-left (H - H % g) x (W - W % g)
    pixels and the few leftover rows at the bottom and columns at the right stay where they are:
    no resampling, so the operation is exactly invertible and the image keeps its size."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    body = images[:, :, :th * grid, :tw * grid]
    tiles = body.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    tiles = tiles[torch.arange(n, device=images.device)[:, None], index.to(images.device)]
    body = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    body = body.reshape(n, c, th * grid, tw * grid)
    if th * grid == h and tw * grid == w:
        return body.contiguous(memory_format=memory_format_of(images))
    out = images.clone()
    out[:, :, :th * grid, :tw * grid] = body
    return out


def memory_format_of(images):
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous() else torch.contiguous_format


def puzzle(images, grid=3, generator=None):
    """Shuffle each image's g x g tiles with its own uniformly random permutation (all (g*g)!
    permutations equally likely, no fixed subset).

    Returns (puzzled, order), where order[b, i] is the index of the original tile now at grid
    position i (row-major). `generator` makes the draw reproducible."""
    n = images.shape[0]
    device = generator.device if generator is not None else images.device
    # argsort of i.i.d. uniform keys is a uniformly random permutation (ties have probability 0)
    order = torch.rand(n, grid * grid, generator=generator, device=device).argsort(dim=1)
    order = order.to(images.device)
    return permute_tiles(images, order, grid), order


def unpuzzle(puzzled, order, grid=3):
    """The inverse of puzzle(): put every tile back where it came from."""
    return permute_tiles(puzzled, order.argsort(dim=1), grid)


class PuzzleHead(nn.Module):
    """g*g classifiers, one per grid position, each over the g*g tiles, on the pooled feature
    (as the official code): one Linear to (g*g)^2 logits, viewed as (N, positions, tiles)."""

    def __init__(self, in_features, grid=3, dropout=0.2):
        super().__init__()
        self.grid = grid
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, grid ** 4)

    def forward(self, pooled):
        return self.linear(self.dropout(pooled)).view(-1, self.grid ** 2, self.grid ** 2)


def puzzle_loss(logits, order):
    """Cross-entropy per grid position, averaged over positions (so λ keeps its meaning across
    grid sizes; the official code summed them)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), order.flatten())


class Puzzle(nn.Module):
    """Puzzling as a part of the model: the images' tiles shuffled; from the pooled feature of
    the puzzled image, the head names the tile at every grid position."""

    def __init__(self, feature_width, grid=3):
        super().__init__()
        self.grid = grid
        self.head = PuzzleHead(feature_width, grid)

    def transform(self, images, landmarks=None, has_landmarks=None, generator=None):
        return puzzle(images, self.grid, generator)

    def loss(self, feature_map, images, order, encoder):
        logits = self.head(encoder.pool(feature_map))
        # the pretext's own score, to see whether it is learned: chance is 1/g^2
        positions_right = (logits.argmax(-1) == order).float().mean()
        return puzzle_loss(logits, order), {"positions_right": positions_right.detach()}


# ----------------------------------------------------------------------------------------------
# Region-masking in-painting ("in-painting-pl", the paper's best). Our design, as the paper's
# body is not public: blank out whole facial parts and reconstruct them from the shared
# encoder's feature map, with a perceptual loss so that the encoder must model the parts.

REGIONS = ("right_eye", "left_eye", "right_brow", "left_brow", "nose", "mouth")

# The 68-point iBUG/300-W landmark convention (0-based; "right" is the subject's right, which
# sits on the left of the image).
LANDMARK_GROUPS = {
    "right_brow": range(17, 22), "left_brow": range(22, 27), "nose": range(27, 36),
    "right_eye": range(36, 42), "left_eye": range(42, 48), "mouth": range(48, 68),
}

# Without landmarks, where the parts sit depends on how the dataset framed its crops, so the
# layout is a parameter: (x0, y0, x1, y1) per region as fractions of the crop the network sees.
# CANONICAL_BOXES is the default, for a detector's face box grown by 10 % on each side and
# squared (as data.py crops AffectNet), set from the median landmark boxes of the demo faces.
CANONICAL_BOXES = {
    "right_eye": (0.25, 0.37, 0.47, 0.51), "left_eye": (0.53, 0.37, 0.75, 0.51),
    "right_brow": (0.22, 0.27, 0.48, 0.38), "left_brow": (0.52, 0.27, 0.78, 0.38),
    "nose": (0.40, 0.39, 0.60, 0.64), "mouth": (0.34, 0.65, 0.66, 0.81),
}

# From five points (eye centres, nose tip, mouth corners: what aligned datasets publish) to the
# six regions. Each region's box relative to its anchor point (an eye centre, the nose tip, the
# mouth corners' midpoint), in units of the distance between the eye centres. Measured by us on
# dlib's mean face shape (the 51 inner points of get_face_chip_details, dlib/image_transforms/
# interpolation.h): each landmark group's bounding box grown by 25 % on every side, as
# region_boxes() grows landmark boxes.
FIVE_POINT_REGIONS = {
    "right_eye": (-0.297, -0.102, 0.307, 0.086), "left_eye": (-0.307, -0.102, 0.297, 0.086),
    "right_brow": (-0.611, -0.414, 0.503, -0.166), "left_brow": (-0.503, -0.414, 0.611, -0.166),
    "nose": (-0.349, -0.791, 0.349, 0.413), "mouth": (-0.669, -0.186, 0.669, 0.330),
}


def five_point_layout(points, width=1.0, height=1.0):
    """A region layout (as CANONICAL_BOXES) from five points (x, y) of a width x height crop
    (by default fractions of it): right eye, left eye (the subject's), nose tip, right and left
    mouth corner."""
    (rx, ry), (lx, ly), nose, mouth_right, mouth_left = [tuple(map(float, p)) for p in points]
    distance = ((lx - rx) ** 2 + (ly - ry) ** 2) ** 0.5
    anchors = {"right_eye": (rx, ry), "left_eye": (lx, ly), "right_brow": (rx, ry),
               "left_brow": (lx, ly), "nose": nose,
               "mouth": ((mouth_right[0] + mouth_left[0]) / 2, (mouth_right[1] + mouth_left[1]) / 2)}
    layout = {}
    for region, (x0, y0, x1, y1) in FIVE_POINT_REGIONS.items():
        ax, ay = anchors[region]
        layout[region] = ((ax + x0 * distance) / width, (ay + y0 * distance) / height,
                          (ax + x1 * distance) / width, (ay + y1 * distance) / height)
    return layout


def region_boxes(batch_size, height, width, landmarks=None, has_landmarks=None, margin=0.25,
                 jitter=0.04, generator=None, device="cpu", layout=None):
    """Boxes (N, len(REGIONS), 4) as pixel (x0, y0, x1, y1), one per facial region.

    Samples with landmarks (landmarks (N, 68, 2) in pixels of the image as the network sees it,
    has_landmarks (N,) bool, default all) get each group's bounding box grown by `margin` of its
    size on every side (at least 2 px). The others get the dataset's `layout` (a dict like
    CANONICAL_BOXES, or a (len(REGIONS), 4) tensor of fractions in REGIONS order; default
    CANONICAL_BOXES), shifted by up to `jitter` of the image size and scaled by up to
    2 * `jitter`, independently per box."""
    layout = CANONICAL_BOXES if layout is None else layout
    if isinstance(layout, dict):
        layout = [layout[r] for r in REGIONS]
    canonical = torch.as_tensor(layout, dtype=torch.float32, device=device)
    canonical = canonical * device_constant((width, height, width, height), device)
    boxes = canonical.expand(batch_size, -1, -1)
    if jitter > 0:
        size = device_constant((width, height), device)
        noise = torch.rand(batch_size, len(REGIONS), 4, generator=generator,
                           device=generator.device if generator is not None else device)
        noise = (noise.to(device) * 2 - 1) * jitter
        shift = noise[..., :2] * size
        grow = noise[..., 2:] * (canonical[:, 2:] - canonical[:, :2])
        boxes = torch.cat([boxes[..., :2] + shift - grow, boxes[..., 2:] + shift + grow], -1)
    if landmarks is not None:
        if has_landmarks is None:
            has_landmarks = torch.ones(batch_size, dtype=torch.bool)
        landmarks = landmarks.to(device=device, dtype=torch.float32)
        groups = [landmarks[:, device_constant(tuple(LANDMARK_GROUPS[r]), device, torch.long)]
                  for r in REGIONS]
        low = torch.stack([g.amin(1) for g in groups], 1)
        high = torch.stack([g.amax(1) for g in groups], 1)
        pad = ((high - low) * margin).clamp(min=2.0)
        from_landmarks = torch.cat([low - pad, high + pad], -1)
        use = has_landmarks.to(device).view(-1, 1, 1)
        boxes = torch.where(use, from_landmarks, boxes)
    limit = device_constant((width, height, width, height), device, boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limit)


def median_layout(landmarks, size):
    """The median landmark box of every region over many faces (landmarks (N, 68, 2) in pixels
    of size x size crops), as a layout: for the faces of a landmark dataset that have none."""
    boxes = region_boxes(len(landmarks), size, size, landmarks, jitter=0.0)
    median = (boxes.median(0).values / size).tolist()
    return {region: tuple(round(v, 4) for v in box) for region, box in zip(REGIONS, median)}


def region_mask(boxes, height, width, regions_per_image=2, generator=None):
    """A (N, 1, H, W) float mask, 1 inside `regions_per_image` distinct regions chosen
    uniformly at random per sample, 0 elsewhere. boxes as from region_boxes()."""
    n, r, _ = boxes.shape
    device = boxes.device
    keys = torch.rand(n, r, generator=generator,
                      device=generator.device if generator is not None else device).to(device)
    chosen = keys.argsort(1)[:, :regions_per_image]
    picked = boxes.gather(1, chosen[..., None].expand(-1, -1, 4))           # (N, k, 4)
    xs = torch.arange(width, device=device, dtype=boxes.dtype) + 0.5       # pixel centres
    ys = torch.arange(height, device=device, dtype=boxes.dtype) + 0.5
    inside_x = (xs >= picked[..., 0:1]) & (xs < picked[..., 2:3])          # (N, k, W)
    inside_y = (ys >= picked[..., 1:2]) & (ys < picked[..., 3:4])          # (N, k, H)
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).any(1)     # (N, H, W)
    return inside[:, None].float()


def mask_images(images, mask, fill="zero"):
    """Blank the masked pixels: "zero" (the dataset mean, on normalised inputs) or "mean" (each
    image's own mean colour)."""
    if fill == "zero":
        value = torch.zeros((), dtype=images.dtype, device=images.device)
    elif fill == "mean":
        value = images.mean((2, 3), keepdim=True)
    else:
        raise ValueError(f"unknown fill {fill!r}; choose 'zero' or 'mean'")
    return torch.where(mask.bool(), value, images)


class InpaintDecoder(nn.Module):
    """A light decoder from the encoder's last feature map (stride 32) back to the image: a 1x1
    reduction to `width` channels, four (upsample x2 -> 3x3 conv -> BN -> SiLU) stages halving
    the width, a 3x3 conv to RGB at stride 2, and a bilinear resize to the input size.
    Stopping at stride 2 keeps the decoder at about a fifth of B0's FLOPs; the masked facial
    parts are large blobs, which half resolution reconstructs well enough."""

    def __init__(self, in_channels, width=128, out_channels=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU()]
        for _ in range(4):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(width, width // 2, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.SiLU()]
            width //= 2
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, feature_map, size):
        return F.interpolate(self.layers(feature_map), size=tuple(size), mode="bilinear",
                             align_corners=False)


def frozen_features(layers, images):
    """`layers` as a fixed feature extractor: BatchNorm in eval mode (running statistics, not
    updated) and parameters detached, so the loss can move the images but never the network.
    Otherwise the encoder could lower the perceptual loss by making its early features
    constant."""
    params = {name: p.detach() for name, p in layers.named_parameters()}
    modes = [(m, m.training) for m in layers.modules()]
    layers.eval()
    try:
        return torch.func.functional_call(layers, params, (images,))
    finally:
        for module, training in modes:
            module.training = training


def inpaint_loss(reconstruction, images, mask, perceptual_net=None, perceptual_weight=1.0):
    """Masked-region L1 + perceptual loss. Returns (total, l1, perceptual).

    Only the masked regions are judged. The L1 term averages |reconstruction - image| over the
    masked pixels. The perceptual term passes the composite (reconstruction inside the mask, the
    image outside) and the image through `perceptual_net` (images in, feature map out; None for
    no perceptual term) and takes the L1 distance of the features over the feature cells that
    the mask touches, relative to the image features' mean magnitude there. Relative, because
    the features' scale drifts during training, and a fixed weight should keep its meaning.
    A perfect reconstruction of the masked regions gives exactly zero."""
    reconstruction = reconstruction.float()
    images = images.float()
    masked_pixels = mask.sum() * images.shape[1]
    l1 = ((reconstruction - images).abs() * mask).sum() / masked_pixels.clamp(min=1)
    perceptual = torch.zeros((), device=images.device)
    if perceptual_net is not None:
        composite = images + mask * (reconstruction - images)
        with torch.no_grad():
            target = perceptual_net(images).float()
        features = perceptual_net(composite).float()
        cells = F.adaptive_max_pool2d(mask.float(), target.shape[-2:])  # cells the mask touches
        perceptual = ((features - target).abs() * cells).sum() / \
            ((target.abs() * cells).sum() + 1e-6)
    return l1 + perceptual_weight * perceptual, l1, perceptual


PERCEPTUAL_STAGES = 2  # the encoder's stem + first MBConv stage: 0.84x SL speed; 3 stages, 0.71x
PERCEPTUALS = ("backbone", "vgg16", "none")


class Inpaint(nn.Module):
    """Region-masking in-painting as a part of the model: `regions_per_image` facial parts
    blanked out (from each face's landmarks, else from `layout`, where the dataset's crops put
    the parts); the decoder reconstructs the image from the feature map of the masked one,
    judged by masked L1 + `perceptual_weight` x a perceptual loss on frozen features of the
    encoder's early stages ("backbone"), of VGG16 ("vgg16"), or none. The layout is a buffer,
    saved with the model."""

    def __init__(self, feature_width, regions_per_image=2, mask_fill="zero", perceptual="backbone",
                 perceptual_weight=1.0, layout=None, vgg_weights=None):
        super().__init__()
        if perceptual not in PERCEPTUALS:
            raise ValueError(f"unknown perceptual network {perceptual!r}; choose from {PERCEPTUALS}")
        self.regions_per_image, self.mask_fill = regions_per_image, mask_fill
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.decoder = InpaintDecoder(feature_width)
        layout = CANONICAL_BOXES if layout is None else layout
        self.register_buffer("region_layout", torch.tensor([layout[r] for r in REGIONS]))
        if perceptual == "vgg16":  # frozen (requires_grad False): saved, never trained
            self.vgg = vgg16_perceptual_net(vgg_weights)

    def transform(self, images, landmarks=None, has_landmarks=None, generator=None):
        n, _, h, w = images.shape
        boxes = region_boxes(n, h, w, landmarks, has_landmarks, generator=generator,
                             device=images.device, layout=self.region_layout)
        mask = region_mask(boxes, h, w, self.regions_per_image, generator).to(images.dtype)
        return mask_images(images, mask, self.mask_fill), mask

    def perceptual_net(self, encoder):
        if self.perceptual == "vgg16":
            return self.vgg
        if self.perceptual == "backbone":
            early = encoder.features[:PERCEPTUAL_STAGES]
            return lambda images: frozen_features(early, images)
        return None

    def loss(self, feature_map, images, mask, encoder):
        reconstruction = self.decoder(feature_map, images.shape[-2:])
        total, l1, perceptual = inpaint_loss(reconstruction, images, mask,
                                             self.perceptual_net(encoder), self.perceptual_weight)
        # the pretext's own score, to see whether it is learned: the masked L1 against that of
        # leaving the fill in place (1.0: no better than the blank; 0: perfect)
        _, fill_l1, _ = inpaint_loss(mask_images(images, mask, self.mask_fill), images, mask)
        return total, {"l1": l1.detach(), "perceptual": perceptual.detach(),
                       "l1_vs_fill": (l1 / fill_l1.clamp(min=1e-6)).detach()}


VGG16_LAYERS = 16  # features[:16]: up to relu3_3, the usual perceptual layers


def vgg16_perceptual_net(weights_path=None):
    """torchvision's ImageNet VGG16 up to relu3_3, frozen. Needs the weights file
    `vgg16-397923af.pth` in torch's hub cache (or `weights_path`; only its `features.*` entries
    are read). Without it, one line says where to put it. Expects ImageNet-normalised inputs."""
    import torchvision  # only this option needs it

    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    path = weights_path or f"{torch.hub.get_dir()}/checkpoints/{url.rsplit('/', 1)[1]}"
    try:
        if weights_path is None:
            torch.hub.load_state_dict_from_url(url, progress=False)  # cache hit, or download
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:  # no network, missing or unreadable file
        raise RuntimeError(f"the vgg16 perceptual network needs the VGG16 ImageNet weights "
                           f"({err.__class__.__name__}): place {url} at {path}") from None
    features = torchvision.models.vgg16().features[:VGG16_LAYERS]
    wanted = {f"features.{k}" for k in features.state_dict()}
    missing = sorted(wanted - set(state))
    if missing:
        raise RuntimeError(f"{path} is not a VGG16 state_dict: {len(missing)} of its "
                           f"features.* entries are missing (first: {missing[0]})")
    features.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k in wanted})
    return features.eval().requires_grad_(False)
