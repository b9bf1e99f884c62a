"""Hybrid Multi-Task Learning (Pourmirzaei, Montazer, Esmaili, arXiv 2105.06421).

A supervised facial task and a self-supervised pretext task share one EfficientNet encoder and
are trained on the joint loss

    L = w_task * L_task + lambda_ssl * L_ssl          (w_task = 1; 0 for pretext-only pre-training)

In the official design one forward pass of the pretext-transformed image (puzzled, or with facial
regions masked) feeds both the task head and the pretext head. At test time images are clean and
the pretext heads are dropped: `export()` returns a plain EfficientNet classifier, so HMTL costs
nothing at inference.

Read in order: the task heads and their losses, the HMTL model, the experiment recipes.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import models
import ssl_tasks

# ----------------------------------------------------------------------------------------------
# Task heads. Every task is a linear layer on the pooled feature: the encoder's own classifier
# (dropout + Linear), sized by task_outputs(). So the exported model is a stock EfficientNet.

TASKS = ("classify", "va", "expr_va", "pose")

# Head pose as in Hopenet (Ruiz et al. 2018): each of yaw, pitch, roll is classified into 66
# bins of 3 degrees over [-99, 99), and regressed through the softmax expectation.
POSE_BINS, POSE_BIN_WIDTH, POSE_LIMIT = 66, 3.0, 99.0


def task_outputs(task, num_classes=None):
    """Width of the task head: the classes for "classify" (expression, gender), 2 for "va"
    (valence, arousal), the classes + 2 for "expr_va" (one head for both, as HSEmotion's
    multi-task EfficientNet), 3 x 66 bins for "pose"."""
    if task == "classify":
        return num_classes
    if task == "expr_va":
        return num_classes + 2
    if task == "va":
        return 2
    if task == "pose":
        return 3 * POSE_BINS
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def class_weights(counts):
    """Class weights n_max / n_c for imbalanced data (the official code's choice): the most
    frequent class weighs 1. Classes absent from the counts weigh 0."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    return torch.where(counts > 0, counts.max() / counts.clamp(min=1), torch.zeros_like(counts))


def classification_loss(logits, labels, weights=None, label_smoothing=0.0):
    return F.cross_entropy(logits.float(), labels, weight=weights, label_smoothing=label_smoothing)


def ccc(pred, target):
    """Lin's concordance correlation coefficient over a batch (1 = perfect agreement)."""
    pred_mean, target_mean = pred.mean(), target.mean()
    covariance = ((pred - pred_mean) * (target - target_mean)).mean()
    return 2 * covariance / (pred.var(unbiased=False) + target.var(unbiased=False)
                             + (pred_mean - target_mean) ** 2 + 1e-8)


def va_loss(pred, target):
    """(1 - CCC(valence)) + (1 - CCC(arousal)). Targets outside [-1, 1] are "not available"
    sentinels (AffectNet writes -2, Aff-Wild2 -5) and take no part. A dimension with fewer than
    2 valid samples contributes 0 (the CCC of one sample is undefined)."""
    pred = pred.float()
    loss = pred.sum() * 0.0  # keeps the graph (and the device) when every target is a sentinel
    for dim in range(2):
        valid = target[:, dim].abs() <= 1
        if valid.sum() >= 2:
            loss = loss + 1 - ccc(pred[valid, dim], target[valid, dim])
    return loss


def valence_arousal(outputs):
    """The head's last two outputs -> (N, 2) valence, arousal in (-1, 1), through tanh: the
    labels' range. Unbounded, they grow with the features that the expression logits share,
    and the CCC's gradient (~1 / their variance) then vanishes (measured on the demo: std 17 to
    661 against 0.4 for the targets, CCC 0.00 at step 300)."""
    return torch.tanh(outputs[:, -2:].float())


def pose_bin_centres(device=None):
    """The 66 bin centres: -97.5, -94.5, ..., 97.5 degrees. (Hopenet's code used the left edges,
    biasing every expectation by -1.5 degrees.)"""
    return torch.arange(POSE_BINS, device=device) * POSE_BIN_WIDTH - POSE_LIMIT + POSE_BIN_WIDTH / 2


def pose_to_bins(angles):
    """Degrees -> bin index in [0, 65]."""
    return ((angles + POSE_LIMIT) / POSE_BIN_WIDTH).floor().long().clamp(0, POSE_BINS - 1)


def pose_expectation(logits):
    """(N, 3, 66) logits -> (N, 3) degrees: the softmax expectation over the bin centres."""
    return logits.float().softmax(-1) @ pose_bin_centres(logits.device)


def pose_loss(logits, angles, alpha=0.001):
    """Per angle: cross-entropy on the bins + alpha * MSE of the expectation in degrees (alpha as
    Hopenet's default); summed over yaw, pitch and roll. logits (N, 3, 66), angles (N, 3)."""
    logits = logits.float().view(-1, 3, POSE_BINS)
    ce = F.cross_entropy(logits.flatten(0, 1), pose_to_bins(angles).flatten()) * 3
    mse = F.mse_loss(pose_expectation(logits), angles.float()) * 3
    return ce + alpha * mse


# ----------------------------------------------------------------------------------------------
# The HMTL model.

SSL_TASKS = ("none", "puzzle", "inpaint")
VIEWS = ("shared", "separate")
PERCEPTUAL = ("backbone", "vgg16", "none")
PERCEPTUAL_STAGES = 2  # stem + first MBConv stage (stride 2): 0.84x SL speed; 3 stages gave 0.71x


class HMTL(nn.Module):
    """Encoder + task head (the encoder's classifier) + an optional pretext head.

    ssl="puzzle": PuzzleHead on the pooled feature; ssl="inpaint": InpaintDecoder on the
    feature map, trained with masked L1 + perceptual loss. view="shared" is the official single
    pass of the transformed image feeding both heads; view="separate" gives the task head the
    clean image and the pretext head the transformed one (one pass over both, concatenated)."""

    def __init__(self, arch="b0", task="classify", num_classes=8, ssl="none", *,
                 lambda_ssl=1.0, task_weight=1.0, view="shared", grid=3,
                 perceptual="backbone", perceptual_weight=1.0, regions_per_image=2,
                 mask_fill="zero", weights=None, label_smoothing=0.0, pose_alpha=0.001,
                 dropout=None, stochastic_depth=None, memory_efficient=False, vgg_weights=None):
        super().__init__()
        for name, value, allowed in (("task", task, TASKS), ("ssl", ssl, SSL_TASKS),
                                     ("view", view, VIEWS), ("perceptual", perceptual, PERCEPTUAL)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {allowed}")
        if task_weight == 0 and ssl == "none":
            raise ValueError("pretext-only training (task_weight=0) needs ssl='puzzle' or 'inpaint'")
        self.task, self.ssl, self.view = task, ssl, view
        self.lambda_ssl, self.task_weight = lambda_ssl, task_weight
        self.grid, self.regions_per_image, self.mask_fill = grid, regions_per_image, mask_fill
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.label_smoothing, self.pose_alpha = label_smoothing, pose_alpha
        regularisation = {k: v for k, v in (("dropout", dropout), ("stochastic_depth", stochastic_depth))
                          if v is not None}  # None: the variant's own (0.2/0.3 and 0.2)
        self.encoder = models.efficientnet(arch, task_outputs(task, num_classes),
                                           memory_efficient=memory_efficient, **regularisation)
        self.register_buffer("weights", None if weights is None else
                             torch.as_tensor(weights, dtype=torch.float32), persistent=False)
        width = self.encoder.num_features
        if ssl == "puzzle":
            self.puzzle_head = ssl_tasks.PuzzleHead(width, grid)
        if ssl == "inpaint":
            self.decoder = ssl_tasks.InpaintDecoder(width)
            if perceptual == "vgg16":  # frozen (requires_grad False): saved, never trained
                self.vgg = ssl_tasks.vgg16_perceptual_net(vgg_weights)

    def forward(self, images):
        """Task outputs on clean images: what the exported model computes."""
        return self.encoder(images)

    def task_loss(self, outputs, targets):
        """targets: class indices ("classify"), (N, 2) valence/arousal ("va"), the pair
        (class indices, valence/arousal) ("expr_va"), or (N, 3) degrees ("pose")."""
        if self.task == "classify":
            return classification_loss(outputs, targets, self.weights, self.label_smoothing)
        if self.task == "va":
            return va_loss(valence_arousal(outputs), targets)
        if self.task == "expr_va":  # class-weighted CE + (1 - CCC_v) + (1 - CCC_a)
            labels, va = targets
            return (classification_loss(outputs[:, :-2], labels, self.weights, self.label_smoothing)
                    + va_loss(valence_arousal(outputs), va))
        return pose_loss(outputs, targets, self.pose_alpha)

    def perceptual_net(self):
        if self.perceptual == "none":
            return None
        if self.perceptual == "vgg16":
            return self.vgg
        early = self.encoder.features[:PERCEPTUAL_STAGES]
        return lambda images: ssl_tasks.frozen_features(early, images)

    def pretext(self, images, landmarks=None, has_landmarks=None, generator=None):
        """The pretext transform of a batch, on its device. Returns (transformed images, what
        the pretext loss needs)."""
        if self.ssl == "puzzle":
            puzzled, order = ssl_tasks.puzzle(images, self.grid, generator)
            return puzzled, order
        n, _, h, w = images.shape
        boxes = ssl_tasks.region_boxes(n, h, w, landmarks, has_landmarks, generator=generator,
                                       device=images.device)
        mask = ssl_tasks.region_mask(boxes, h, w, self.regions_per_image, generator)
        mask = mask.to(images.dtype)
        return ssl_tasks.mask_images(images, mask, self.mask_fill), mask

    def losses(self, images, targets=None, landmarks=None, has_landmarks=None, generator=None):
        """The joint loss of one training batch. Returns (parts, task outputs): parts["loss"] is
        what to backpropagate; "task" and "ssl" (and for in-painting "l1", "perceptual") are
        detached, for logging. Task outputs are None in pretext-only training."""
        if self.ssl == "none":
            outputs = self.encoder(images)
            task = self.task_loss(outputs, targets)
            return {"loss": task, "task": task.detach()}, outputs

        transformed, pretext_target = self.pretext(images, landmarks, has_landmarks, generator)
        pretext_only = self.task_weight == 0
        if self.view == "separate" and not pretext_only:
            # clean view -> task head, transformed view -> pretext head, in one encoder pass
            both = self.encoder.forward_features(torch.cat([images, transformed]))
            clean_map, feature_map = both.chunk(2)
        else:
            clean_map = feature_map = self.encoder.forward_features(transformed)
        pooled = self.encoder.pool(feature_map)
        parts = {}
        if self.ssl == "puzzle":
            ssl = ssl_tasks.puzzle_loss(self.puzzle_head(pooled), pretext_target)
        else:
            reconstruction = self.decoder(feature_map, images.shape[-2:])
            ssl, l1, perceptual = ssl_tasks.inpaint_loss(
                reconstruction, images, pretext_target, self.perceptual_net(),
                self.perceptual_weight)
            parts.update(l1=l1.detach(), perceptual=perceptual.detach())
        if pretext_only:
            return {"loss": self.lambda_ssl * ssl, "ssl": ssl.detach(), **parts}, None
        outputs = self.encoder.classifier(self.encoder.pool(clean_map))
        task = self.task_loss(outputs, targets)
        loss = self.task_weight * task + self.lambda_ssl * ssl
        return {"loss": loss, "task": task.detach(), "ssl": ssl.detach(), **parts}, outputs

def model_from_config(config, num_classes, weights=None):
    """The HMTL model a resolved train.py config describes (one place, for train.py and eval.py)."""
    task_weight = config["task_weight"]
    return HMTL(config["arch"], config["task"], num_classes, config["ssl"],
                lambda_ssl=config["lambda_ssl"], task_weight=task_weight, view=config["view"],
                grid=config["grid"], perceptual=config["perceptual"],
                perceptual_weight=config["perceptual_weight"],
                regions_per_image=config["regions_per_image"], mask_fill=config["mask_fill"],
                weights=weights, label_smoothing=config["label_smoothing"],
                pose_alpha=config["pose_alpha"], dropout=config["dropout"],
                stochastic_depth=config["stochastic_depth"])


def export(model):
    """The deployable model: the encoder and its task head, no pretext head, no decoder. A plain
    models.EfficientNet in eval mode (state_dict keys are torchvision's)."""
    return copy.deepcopy(model.encoder).eval()


# ----------------------------------------------------------------------------------------------
# Experiment recipes: one per experiment of the paper (DESIGN.md, "Experiments"), selected by
# name in train.py (`--recipe NAME`; command-line flags override). DEFAULTS lists every setting
# a recipe may change; values are ours where the paper is silent (README, "Deviations").

DEFAULTS = dict(
    dataset="affectnet", classes=8, task="classify", arch="b0", init="scratch",
    ssl="none", lambda_ssl=1.0, task_weight=1.0, view="shared", grid=3,
    perceptual="backbone", perceptual_weight=1.0, regions_per_image=2, mask_fill="zero",
    image_size=224, batch_size=128, epochs=80, lr=1e-3, weight_decay=1e-2, warmup_epochs=3,
    optimizer="adamw", augment="weak", imbalance="weights", train_fraction=1.0,
    label_smoothing=0.0, pose_alpha=0.001, dropout=None, stochastic_depth=None,
)


def _grid(prefix, values, **fixed):
    return {f"{prefix}-{key}": dict(fixed, **overrides) for key, overrides in values.items()}


SSL_VARIANTS = {"sl": dict(ssl="none"), "puzzle": dict(ssl="puzzle"), "inpaint": dict(ssl="inpaint")}

RECIPES = {
    # A tiny preset that trains on the built-in demo set on a CPU in minutes. Dropout and
    # stochastic depth off: from scratch on 2,400 images they delay the start of learning by
    # ~200 steps (measured: val accuracy 0.26 / 0.36 / 0.64 at steps 100 / 200 / 300 without
    # them, 0.13 / 0.22 / 0.39 with them).
    # The demo faces already vary in pose, scale and light, so only flips are added: with the
    # weak level, 6 epochs of SL reached 0.29 instead of 0.69. From scratch, a pretext loss at
    # lambda 1 keeps the task from taking off within the demo's 450 steps (6 epochs: 0.16
    # puzzle, 0.14 in-painting), so the demo uses lambda 0.3 (one of the official code's values).
    # Validation accuracy at step 300 (probes, same seed): SL 0.64; in-painting shared 0.27;
    # puzzle shared 0.10, separate 0.375. The task head of the shared puzzle view only ever sees
    # shuffled faces, so the demo's puzzle recipe uses the separate view.
    **_grid("demo", {"sl": dict(ssl="none"), "puzzle": dict(ssl="puzzle", view="separate"),
                     "inpaint": dict(ssl="inpaint")},
            dataset="demo", image_size=64, batch_size=32, epochs=6, warmup_epochs=0.5, lr=3e-3,
            dropout=0.0, stochastic_depth=0.0, augment="none", lambda_ssl=0.3),
    # 1. ImageNet initialisation vs scratch, under augmentation none / weak / strong.
    **{f"affectnet8-{init}-{aug}": dict(init=init, augment=aug)
       for init in ("scratch", "imagenet") for aug in ("none", "weak", "strong")},
    # 2. SL vs SL + puzzling vs SL + in-painting-pl, B0 and B2, AffectNet-8.
    **{f"affectnet8-{name}-{arch}": dict(arch=arch, **variant)
       for name, variant in SSL_VARIANTS.items() for arch in ("b0", "b2")},
    # 3. Low data: a stratified 20 % of the training set.
    **_grid("affectnet8-20pct", SSL_VARIANTS, train_fraction=0.2),
    # 4. Conventional SSL: pretext-only pre-training (no labels used), then supervised
    #    fine-tuning from that checkpoint (train.py --init PATH), to compare with HMTL.
    **_grid("affectnet8-pretrain", {"puzzle": dict(ssl="puzzle"), "inpaint": dict(ssl="inpaint")},
            task_weight=0.0),
    "affectnet8-finetune": dict(ssl="none", init="runs/affectnet8-pretrain-inpaint/last.pt"),
    # 5. CK+ nonlinear evaluation is eval.py's protocol on an AffectNet-trained encoder.
    # 6. Head pose: train on 300W-LP, test on AFLW2000 (and BIWI); MAE per angle.
    **_grid("headpose", SSL_VARIANTS, dataset="300w_lp", task="pose", classes=None,
            imbalance="none", epochs=25, augment="weak"),
    # 7. Gender recognition, CelebA "Male".
    **_grid("gender-celeba", SSL_VARIANTS, dataset="celeba", classes=2, imbalance="none",
            epochs=20),
}


def recipe(name):
    """DEFAULTS updated with the named recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    unknown = set(RECIPES[name]) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"recipe {name!r} sets unknown settings {sorted(unknown)}")
    return {**DEFAULTS, **RECIPES[name]}
