"""Hybrid Multi-Task Learning (Pourmirzaei, Montazer, Esmaili, arXiv 2105.06421).

A supervised facial task and a self-supervised pretext task share one EfficientNet encoder and
are trained on the joint loss

    L = w_task * L_task + lambda_ssl * L_ssl          (w_task = 1; 0 for pretext-only pre-training)

The parts, each in its own file:
    encoder   models.efficientnet: EfficientNet-B0/B2, written by hand
    task      tasks.TaskLoss: the facial task's loss (expression, valence/arousal, head pose...);
              its head is the encoder's own classifier (or the Emotion-GCN head, tasks.GraphHead)
    pretext   ssl_tasks.Puzzle or ssl_tasks.Inpaint: transform(images) and loss(feature map)

In the official design one forward pass of the pretext-transformed image feeds both the task
head and the pretext head (view="shared"). view="separate" gives the task head the clean image
and the pretext head the transformed one, in one encoder pass over both. At test time images
are clean and the pretext head is dropped: export() returns a plain EfficientNet classifier, so
HMTL costs nothing at inference.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import models
import ssl_tasks
import tasks

SSL_TASKS = ("none", "puzzle", "inpaint")
VIEWS = ("shared", "separate")


class HMTL(nn.Module):
    """encoder + task loss (+ a GCN head) + an optional pretext task. `classes` (names, in the
    dataset's order) and `image_size` say what its outputs mean and what it reads: predict()
    and export() use them, and checkpoints carry them."""

    def __init__(self, encoder, task_loss, pretext=None, *, lambda_ssl=1.0, task_weight=1.0,
                 view="shared", graph_head=None, classes=None, image_size=224):
        super().__init__()
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
        if task_weight == 0 and pretext is None:
            raise ValueError("pretext-only training (task_weight 0) needs a pretext task")
        self.encoder, self.task_loss, self.graph_head, self.pretext = encoder, task_loss, graph_head, pretext
        self.lambda_ssl, self.task_weight, self.view = lambda_ssl, task_weight, view
        self.classes, self.image_size = list(classes) if classes else None, image_size
        # The task head starts at zero: every class at 1/C (loss ln C), every regression output
        # at 0. The reference init (uniform, bound 1/sqrt(outputs)) was made for 1,000 classes;
        # for 8 it gave logits of std 2.5 on a fresh B0 and a first loss near 4.0, not ln 8 = 2.08.
        nn.init.zeros_(encoder.classifier[1].weight)
        if graph_head is not None:  # the linear layer is unused in training: export() fills it
            encoder.classifier[1].requires_grad_(False)

    def task_head(self, pooled):
        """Task outputs from the pooled feature (the encoder's dropout applies to both heads)."""
        if self.graph_head is not None:
            return F.linear(self.encoder.classifier[0](pooled), self.graph_head.node_weights())
        return self.encoder.classifier(pooled)

    def forward(self, images):
        """Task outputs on clean (normalised) images: what the exported model computes."""
        return self.task_head(self.encoder.pool(self.encoder.forward_features(images)))

    def losses(self, images, targets=None, landmarks=None, has_landmarks=None, generator=None,
               unlabelled=None):
        """The joint loss of one training batch. Returns (parts, task outputs): parts["loss"] is
        what to backpropagate; "task" and "ssl" (and the pretext's own parts: its score, e.g.
        the puzzle's "positions_right", and in-painting's "l1" and "perceptual") are detached,
        for logging. Task outputs are None in pretext-only training. targets: the labels the
        task reads (tasks.TASKS[task].labels), by name. `unlabelled`: (images, landmarks,
        has_landmarks) of a batch without labels, for semi-supervised HMTL (as S4L, Zhai et
        al., ICCV 2019): the pretext task runs on both batches, the task on the labelled one."""
        if self.pretext is None:
            outputs = self(images)
            task = self.task_loss(outputs, targets)
            return {"loss": task, "task": task.detach()}, outputs

        labelled = len(images)
        if unlabelled is not None:
            images, landmarks, has_landmarks = (torch.cat(pair) for pair in zip(
                (images, landmarks, has_landmarks), unlabelled))
        transformed, pretext_target = self.pretext.transform(images, landmarks, has_landmarks, generator)
        pretext_only = self.task_weight == 0
        if self.view == "separate" and not pretext_only:
            # clean view -> task head, transformed view -> pretext head, in one encoder pass
            both = self.encoder.forward_features(torch.cat([images[:labelled], transformed]))
            clean_map, feature_map = both[:labelled], both[labelled:]
        else:
            feature_map = self.encoder.forward_features(transformed)
            clean_map = feature_map[:labelled]
        ssl, parts = self.pretext.loss(feature_map, images, pretext_target, self.encoder)
        if pretext_only:
            return {"loss": self.lambda_ssl * ssl, "ssl": ssl.detach(), **parts}, None
        outputs = self.task_head(self.encoder.pool(clean_map))
        task = self.task_loss(outputs, targets)
        loss = self.task_weight * task + self.lambda_ssl * ssl
        return {"loss": loss, "task": task.detach(), "ssl": ssl.detach(), **parts}, outputs

    # what the task and pretext parts are, in words (logs, checkpoints, the exported files)
    task = property(lambda self: self.task_loss.task)
    num_classes = property(lambda self: self.task_loss.num_classes)
    ssl = property(lambda self: "none" if self.pretext is None else
                   "puzzle" if isinstance(self.pretext, ssl_tasks.Puzzle) else "inpaint")


def export(model):
    """The deployable model: the encoder and its task head, no pretext head, no decoder. A plain
    models.EfficientNet in eval mode (state_dict keys are torchvision's). A GCN head's weights
    are a constant once trained: they become the linear classifier's, with a zero bias."""
    deployed = copy.deepcopy(model.encoder).eval()
    for module in deployed.modules():  # a compiled encoder (Module.compile) deploys uncompiled
        module._compiled_call_impl = None
    if model.graph_head is not None:
        with torch.no_grad():
            deployed.classifier[1].weight.copy_(model.graph_head.node_weights())
            deployed.classifier[1].bias.zero_()
    return deployed


def build(config, classes=None, class_weights=None, graph=None, node_vectors=None,
          au_pos_weight=None, region_layout=None):
    """The HMTL model a train.py configuration describes (train.py's DEFAULTS list the keys).
    `classes`: the dataset's class names; `graph`, `node_vectors`: the GCN head's
    (tasks.emotion_graph, tasks.read_node_vectors); `region_layout`: where in-painting masks
    the faces without landmarks (ssl_tasks.CANONICAL_BOXES by default)."""
    num_classes = len(classes) if classes else None
    task_loss = tasks.TaskLoss(config["task"], num_classes, class_weights, config["label_smoothing"],
                               config["pose_alpha"], config.get("mtl_weights", (1.0, 1.0, 1.0)),
                               au_pos_weight)
    # From scratch, every residual block starts as the identity (zero_init_residual): with
    # the reference init, 3 seeds of the demo's SL run ended 0.84 / 0.84 / 0.90 and took
    # 2-3 epochs to leave chance; with it, 0.97 / 0.97 / 0.97 (README, "Deviations").
    # tf_variant: TensorFlow's EfficientNet (BN eps, SAME padding), to start from the face
    # models of timm and HSEmotion (models.TF_VARIANT).
    regularisation = {k: config[k] for k in ("dropout", "stochastic_depth") if config[k] is not None}
    encoder = models.efficientnet(config["arch"], task_loss.outputs, zero_init_residual=True,
                                  memory_efficient=config.get("memory_efficient", False),
                                  **regularisation,
                                  **(models.TF_VARIANT if config.get("tf_variant") else {}))
    graph_head = None
    head = config.get("head", "linear")  # settings added after a checkpoint take their defaults
    if head == "gcn":
        if config["task"] != "expr_va" or graph is None:
            raise ValueError("the GCN head predicts expressions and valence/arousal together: it "
                             "needs task expr_va and the label graph (tasks.emotion_graph)")
        graph_head = tasks.GraphHead(graph, encoder.num_features, node_vectors)
    elif head != "linear":
        raise ValueError(f"unknown head {head!r}; choose from {tasks.HEADS}")
    pretext = None
    if config["ssl"] == "puzzle":
        pretext = ssl_tasks.Puzzle(encoder.num_features, config["grid"])
    elif config["ssl"] == "inpaint":
        pretext = ssl_tasks.Inpaint(encoder.num_features, config["regions_per_image"], config["mask_fill"],
                                    config["perceptual"], config["perceptual_weight"], region_layout)
    elif config["ssl"] != "none":
        raise ValueError(f"unknown pretext task {config['ssl']!r}; choose from {SSL_TASKS}")
    return HMTL(encoder, task_loss, pretext, lambda_ssl=config["lambda_ssl"],
                task_weight=config["task_weight"], view=config["view"], graph_head=graph_head,
                classes=classes, image_size=config["image_size"])


# Checkpoints written before the pretext tasks became modules named their parts so.
OLD_KEYS = {"puzzle_head.": "pretext.head.", "decoder.": "pretext.decoder.", "vgg.": "pretext.vgg."}


def load_state(model, state):
    """model.load_state_dict(state), also for a checkpoint written before the pretext tasks
    became modules (its in-painting layout, then not saved, stays the model's own)."""
    state = {next((new + k[len(old):] for old, new in OLD_KEYS.items() if k.startswith(old)), k): v
             for k, v in state.items()}
    if isinstance(model.pretext, ssl_tasks.Inpaint):
        state.setdefault("pretext.region_layout", model.pretext.region_layout)
    model.load_state_dict(state)
