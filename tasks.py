"""The facial tasks that HMTL trains beside a pretext task: their heads' widths, losses,
metrics and predictions, one row per task (TASKS), and the Emotion-GCN head.

    classify   expression (AffectNet, CK+, FER2013, RAF-DB...) or gender: cross-entropy
    va         valence and arousal (Aff-Wild2's VA challenge): 1 - CCC per dimension
    expr_va    both from one head, as HSEmotion's multi-task EfficientNet
    pose       yaw, pitch, roll as Hopenet's 66 bins: cross-entropy + alpha * MSE
    mtl        ABAW-4's multi-task challenge: expressions, VA and 12 action units, each masked

hmtl.py holds the method (the joint loss); this file holds what differs from task to task.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import AU_NAMES, UnknownName, UserError  # AU_NAMES: ABAW's 12 action units, in the files' order

# ----------------------------------------------------------------------------------------------
# Task heads. Every task is a linear layer on the pooled feature: the encoder's own classifier
# (dropout + Linear), sized by the task (TASKS, at the end of this section). So the exported
# model is a stock EfficientNet (the Emotion-GCN head below computes that layer's weights, and
# export() writes them into it). First the pieces: losses, then metrics; then the table.

# Head pose as in Hopenet (Ruiz et al. 2018): each of yaw, pitch, roll is classified into 66
# bins of 3 degrees over [-99, 99), and regressed through the softmax expectation.
POSE_BINS, POSE_BIN_WIDTH, POSE_LIMIT = 66, 3.0, 99.0


def class_weights(counts):
    """Class weights n_max / n_c for imbalanced data (the official code's choice): the most
    frequent class weighs 1. Classes absent from the counts weigh 0."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    return torch.where(counts > 0, counts.max() / counts.clamp(min=1), torch.zeros_like(counts))


def classification_loss(logits, labels, weights=None, label_smoothing=0.0):
    return F.cross_entropy(logits.float(), labels, weight=weights, label_smoothing=label_smoothing)


def ccc(pred, target, valid=None):
    """Lin's concordance correlation coefficient over a batch (1 = perfect agreement), with
    population statistics. With `valid` (N,) bool, over those samples only, taken as weights:
    no data-dependent shape, so nothing waits for the device to know how many there are."""
    weight = torch.ones_like(pred) if valid is None else valid.to(pred.dtype)
    if valid is not None:  # sentinels out of the sums
        target = torch.where(valid, target, torch.zeros_like(target))
    count = weight.sum().clamp(min=1)
    pred_mean, target_mean = (pred * weight).sum() / count, (target * weight).sum() / count
    pred_dev, target_dev = (pred - pred_mean) * weight, (target - target_mean) * weight
    covariance = (pred_dev * target_dev).sum() / count
    return 2 * covariance / ((pred_dev ** 2).sum() / count + (target_dev ** 2).sum() / count
                             + (pred_mean - target_mean) ** 2 + 1e-8)


def va_loss(pred, target):
    """(1 - CCC(valence)) + (1 - CCC(arousal)). Targets outside [-1, 1] are "not available"
    sentinels (AffectNet writes -2, Aff-Wild2 -5) and take no part. A dimension with fewer than
    2 valid samples contributes 0 (the CCC of one sample is undefined)."""
    pred, loss = pred.float(), 0.0
    for dim in range(2):
        valid = target[:, dim].abs() <= 1
        term = 1 - ccc(pred[:, dim], target[:, dim].float(), valid)
        loss = loss + torch.where(valid.sum() >= 2, term, torch.zeros_like(term))
    return loss


def valence_arousal(raw):
    """Two raw head outputs (N, 2) -> valence, arousal in (-1, 1), through tanh: the labels'
    range. Unbounded, they grow with the features that the expression logits share,
    and the CCC's gradient (~1 / their variance) then vanishes (measured on the demo: std 17 to
    661 against 0.4 for the targets, CCC 0.00 at step 300)."""
    return torch.tanh(raw.float())


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


# ABAW's multi-task challenge (s-Aff-Wild2): valence/arousal, 8 expressions and 12 action units
# per frame, each possibly missing (VA -5, expression -1, AUs -1). One head: the expression
# logits first (as "classify"), then valence and arousal (as "expr_va"), then 12 AU logits.
MTL_TERMS = ("va", "expression", "au")  # the order of --mtl-weights


def masked_cross_entropy(logits, labels, weights=None):
    """Cross-entropy over the samples labelled >= 0 (the class-weighted mean, as F.cross_entropy
    takes it); exactly 0, not NaN, when the batch has none."""
    labelled = labels >= 0
    safe = labels.clamp(min=0)
    per_sample = F.cross_entropy(logits.float(), safe, weight=weights, reduction="none")
    weight = labelled.float() if weights is None else labelled.float() * weights[safe]
    return (per_sample * weight).sum() / weight.sum().clamp(min=1e-12)


def masked_au_loss(logits, au, pos_weight=None):
    """Binary cross-entropy with logits per AU over the labelled entries (-1 = missing); 0 when
    there are none. `pos_weight` (12,) weighs each AU's positives (rare AUs)."""
    labelled = (au >= 0).float()
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), au.clamp(min=0).float(),
                                                   pos_weight=pos_weight, reduction="none")
    return (per_entry * labelled).sum() / labelled.sum().clamp(min=1)


def mtl_loss(outputs, targets, num_classes, weights=None, term_weights=(1.0, 1.0, 1.0),
             au_pos_weight=None):
    """w_va * ((1 - CCC_v) + (1 - CCC_a)) + w_expr * CE + w_au * BCE, each term over the frames
    labelled for it; a term with no labelled frame in the batch adds 0."""
    w_va, w_expression, w_au = term_weights
    expression = outputs[:, :num_classes]
    va = valence_arousal(outputs[:, num_classes:num_classes + 2])
    au = outputs[:, num_classes + 2:]
    return (w_va * va_loss(va, targets["va"])
            + w_expression * masked_cross_entropy(expression, targets["target"], weights)
            + w_au * masked_au_loss(au, targets["au"], au_pos_weight))


# Metrics, over a whole split (CPU tensors or numpy arrays).

def classification_metrics(predictions, labels, classes):
    """Accuracy, balanced accuracy (mean recall over the classes present), macro-F1 (over the
    classes present), per-class recall and the confusion matrix (rows: true class)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_counts, hits = confusion.sum(1), np.diag(confusion)
    present = true_counts > 0
    recall = np.divide(hits, true_counts, out=np.zeros(n), where=present)
    f1 = f1_per_class(predictions, labels, n)
    return {"samples": int(len(labels)), "accuracy": float(hits.sum() / max(1, len(labels))),
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class_recall": {c: float(r) for c, r, p in zip(classes, recall, present) if p},
            "classes": list(classes), "confusion": confusion.tolist()}


def without_class(logits, labels, index):
    """Drop one class: its samples and its logit (AffectNet's 7-class score of an 8-class
    model drops Contempt). Labels above the index shift down by one."""
    keep = labels != index
    columns = [c for c in range(logits.shape[1]) if c != index]
    labels = labels[keep]
    return logits[keep][:, columns], labels - (labels > index).long()


def va_metrics(prediction, target):
    """CCC and RMSE for valence and arousal over the samples whose target is in [-1, 1]."""
    out = {}
    for dim, name in enumerate(("valence", "arousal")):
        valid = target[:, dim].abs() <= 1
        if valid.sum() >= 2:
            p, t = prediction[valid, dim].float(), target[valid, dim].float()
            out[f"ccc_{name}"] = float(ccc(p, t))
            out[f"rmse_{name}"] = float((p - t).square().mean().sqrt())
    if "ccc_valence" in out and "ccc_arousal" in out:
        out["ccc_mean"] = (out["ccc_valence"] + out["ccc_arousal"]) / 2
    return out


def pose_metrics(predicted, target):
    """Mean absolute error in degrees of yaw, pitch, roll (columns in that order), and their
    mean."""
    error = (predicted.float() - target.float()).abs().mean(0).tolist()
    return {"mae_yaw": error[0], "mae_pitch": error[1], "mae_roll": error[2],
            "mae_mean": sum(error) / 3, "samples": int(len(target))}


def f1_per_class(predictions, labels, n):
    """Positive-class F1 of each of n classes, 2 hits / (predicted + true); 0 for a class never
    true and never predicted (sklearn's zero_division=0, as the ABAW scorer)."""
    predictions, labels = np.asarray(predictions).astype(int), np.asarray(labels).astype(int)
    hits = np.bincount(labels[predictions == labels], minlength=n)
    total = np.bincount(predictions, minlength=n) + np.bincount(labels, minlength=n)
    return np.divide(2 * hits, total, out=np.zeros(n), where=total > 0)


def population_ccc(prediction, target):
    """ccc() on numpy arrays in float64 (population statistics, as the ABAW scorer); 0 for
    fewer than 2 frames."""
    if len(prediction) < 2:
        return 0.0
    return float(ccc(torch.as_tensor(prediction, dtype=torch.float64),
                     torch.as_tensor(target, dtype=torch.float64)))


def p_mtl(predictions, targets, au_threshold=0.5):
    """ABAW-4's multi-task score: 0.5 (CCC_V + CCC_A) + macro-F1 over the 8 expressions + the
    mean F1 over the 12 AUs, each over the frames labelled for it (VA: both in [-1, 1], so
    not ABAW's -5;
    expression: not -1; AUs: not -1). predictions: {"va": N x 2, "expression": N x 8 logits,
    "au": N x 12 probabilities}; targets: {"va": N x 2, "expression": N, "au": N x 12}; numpy
    or tensors. `au_threshold`: one number, or one per AU."""
    p = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, np.float64)
         for k, v in predictions.items()}
    t = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, np.float64)
         for k, v in targets.items()}
    va_ok = (np.abs(t["va"]) <= 1).all(1)  # ABAW's -5 (and AffectNet's -2): not labelled
    ccc_valence = population_ccc(p["va"][va_ok, 0], t["va"][va_ok, 0])
    ccc_arousal = population_ccc(p["va"][va_ok, 1], t["va"][va_ok, 1])
    labelled = t["expression"] >= 0
    expression_f1 = float(f1_per_class(p["expression"][labelled].argmax(1),
                                       t["expression"][labelled].astype(int),
                                       p["expression"].shape[1]).mean())
    threshold = np.broadcast_to(np.asarray(au_threshold, np.float64), (len(AU_NAMES),))
    per_au = []
    for k in range(t["au"].shape[1]):
        ok = t["au"][:, k] >= 0
        per_au.append(float(f1_per_class((p["au"][ok, k] >= threshold[k]).astype(int),
                                         t["au"][ok, k].astype(int), 2)[1]))
    au_f1 = float(np.mean(per_au))
    return {"p_mtl": 0.5 * (ccc_valence + ccc_arousal) + expression_f1 + au_f1,
            "ccc_valence": ccc_valence, "ccc_arousal": ccc_arousal,
            "expression_f1": expression_f1, "au_f1": au_f1,
            "au_f1_per_au": dict(zip(AU_NAMES, per_au)),
            "frames": {"va": int(va_ok.sum()), "expression": int(labelled.sum()),
                       "au": int((t["au"] >= 0).all(1).sum())}}


def tuned_au_thresholds(probabilities, au, grid=tuple(round(0.1 * k, 1) for k in range(1, 10))):
    """Per AU, the threshold in `grid` with the best F1 on these frames. Chosen on the split it
    is then scored on, so that score is optimistic (the ABAW teams report it as such)."""
    probabilities, au = np.asarray(probabilities), np.asarray(au)
    best = []
    for k in range(au.shape[1]):
        ok = au[:, k] >= 0
        scores = [f1_per_class((probabilities[ok, k] >= g).astype(int), au[ok, k].astype(int), 2)[1]
                  for g in grid]
        best.append(grid[int(np.argmax(scores))])
    return best


# The tasks. Each is one row: what its head outputs, which labels of a batch it reads, its loss,
# the metrics its protocol reports, the one number that picks best.pt (higher is better), and
# how one output reads as a prediction. train.py and eval.py read these and never branch on the
# task's name.

@dataclass(frozen=True)
class Task:
    outputs: object             # num_classes -> width of the head
    labels: tuple               # batch keys the loss and metrics read ("target", "va", "au")
    loss: object                # (model, outputs, targets) -> scalar
    metrics: object             # (outputs, targets, classes) -> dict
    selection: object           # (metrics, dataset name) -> float
    predict: object             # (one output row, classes) -> {"label": ..., its parts}
    angles: bool = False        # its "target" is head pose, which augmentation must move
    class_logits: object = None  # (outputs, num_classes) -> the class logits, where "target" is a class


def expression_metrics(logits, labels, classes):
    """Classification metrics; on AffectNet-8 also the 7-class score (Contempt dropped)."""
    metrics = classification_metrics(logits.argmax(1).numpy(), labels.numpy(), classes)
    if len(classes) == 8 and classes[7] == "Contempt":
        logits7, labels7 = without_class(logits, labels, 7)
        seven = classification_metrics(logits7.argmax(1).numpy(), labels7.numpy(), classes[:7])
        metrics["seven_class"] = {k: seven[k] for k in ("samples", "accuracy", "balanced_accuracy",
                                                        "macro_f1")}
    return metrics


MACRO_F1_DATASETS = ("affwild2", "abaw_lsd")  # scored by macro-F1, as the ABAW challenges do


def expression_score(metrics, dataset):
    """Accuracy, as the expression papers report; macro-F1 on the ABAW challenges' sets."""
    return metrics["macro_f1" if dataset in MACRO_F1_DATASETS else "accuracy"]


def class_prediction(logits, classes):
    """The most probable class's name, and every class's probability by name."""
    probabilities = logits.float().softmax(0).tolist()
    names = classes or [str(c) for c in range(len(probabilities))]
    return {"label": names[int(np.argmax(probabilities))],
            "probabilities": dict(zip(names, probabilities))}


def va_prediction(output, classes=None):
    """Valence and arousal in (-1, 1): the tanh of the head's two raw outputs."""
    valence, arousal = valence_arousal(output[None, -2:])[0].tolist()
    return {"label": f"valence {valence:.3f} arousal {arousal:.3f}", "valence": valence,
            "arousal": arousal}


def mtl_split(outputs, num_classes):
    """MTL head outputs -> (expression logits, valence/arousal in (-1, 1), AU probabilities)."""
    return (outputs[:, :num_classes], valence_arousal(outputs[:, num_classes:num_classes + 2]),
            torch.sigmoid(outputs[:, num_classes + 2:].float()))


def mtl_metrics(outputs, targets, classes):
    expression, va, au = mtl_split(outputs, len(classes))
    scores = p_mtl({"va": va, "expression": expression, "au": au},
                   {"va": targets["va"], "expression": targets["target"], "au": targets["au"]})
    tuned = tuned_au_thresholds(au.numpy(), targets["au"].numpy())
    optimistic = p_mtl({"va": va, "expression": expression, "au": au},
                       {"va": targets["va"], "expression": targets["target"], "au": targets["au"]}, tuned)
    # the chance level to read P_MTL against: a constant answer (VA 0: CCC 0; the most frequent
    # expression; every AU present, which is the best constant for F1)
    labels = targets["target"][targets["target"] >= 0]
    majority = int(labels.mode().values) if len(labels) else 0
    constant = p_mtl({"va": torch.zeros_like(va), "expression": F.one_hot(
        torch.full((len(va),), majority), expression.shape[1]).float(), "au": torch.ones_like(au)},
        {"va": targets["va"], "expression": targets["target"], "au": targets["au"]})
    return {**scores, "p_mtl_constant_baseline": constant["p_mtl"], "tuned_thresholds_optimistic": {
        "p_mtl": optimistic["p_mtl"], "au_f1": optimistic["au_f1"],
        "thresholds": dict(zip(AU_NAMES, tuned))}}


def mtl_prediction(output, classes):
    """The expression (label and probabilities), valence and arousal, and each AU's probability
    with the AUs present at threshold 0.5."""
    expression, va, au = mtl_split(output[None], len(classes))
    units = dict(zip(AU_NAMES, au[0].tolist()))
    return {**class_prediction(expression[0], classes), "valence": float(va[0, 0]),
            "arousal": float(va[0, 1]), "action_units": units,
            "active_action_units": [name for name, p in units.items() if p >= 0.5]}


def angles_prediction(output, classes):
    """Yaw, pitch and roll in degrees (the expectation over each angle's bins)."""
    yaw, pitch, roll = pose_expectation(output.view(1, 3, POSE_BINS))[0].tolist()
    return {"label": f"yaw {yaw:.1f} pitch {pitch:.1f} roll {roll:.1f}", "yaw": yaw,
            "pitch": pitch, "roll": roll}


def expr_va_prediction(output, classes):
    va = va_prediction(output)
    return {**class_prediction(output[:-2], classes), "valence": va["valence"],
            "arousal": va["arousal"]}


TASKS = {
    # expression or gender: the classes
    "classify": Task(
        outputs=lambda classes: classes, labels=("target",),
        loss=lambda m, out, t: classification_loss(out, t["target"], m.weights, m.label_smoothing),
        metrics=lambda out, t, classes: expression_metrics(out, t["target"], classes),
        selection=expression_score,
        predict=class_prediction, class_logits=lambda out, n: out),
    # valence and arousal (Aff-Wild2's VA challenge)
    "va": Task(
        outputs=lambda classes: 2, labels=("va",),
        loss=lambda m, out, t: va_loss(valence_arousal(out[:, -2:]), t["va"]),
        metrics=lambda out, t, classes: va_metrics(valence_arousal(out[:, -2:]), t["va"]),
        selection=lambda metrics, dataset: metrics.get("ccc_mean", -1.0),
        predict=va_prediction),
    # both in one head, as HSEmotion's multi-task EfficientNet: class-weighted CE + (1 - CCC)s
    "expr_va": Task(
        outputs=lambda classes: classes + 2, labels=("target", "va"),
        loss=lambda m, out, t: (classification_loss(out[:, :-2], t["target"], m.weights,
                                                    m.label_smoothing)
                                + va_loss(valence_arousal(out[:, -2:]), t["va"])),
        metrics=lambda out, t, classes: {**expression_metrics(out[:, :-2], t["target"], classes),
                                         **va_metrics(valence_arousal(out[:, -2:]), t["va"])},
        selection=lambda metrics, dataset: (expression_score(metrics, dataset)
                                            + metrics.get("ccc_mean", 0.0)),  # ABAW-style sum
        predict=expr_va_prediction, class_logits=lambda out, n: out[:, :-2]),
    # head pose, Hopenet's bins: yaw, pitch, roll in degrees
    "pose": Task(
        outputs=lambda classes: 3 * POSE_BINS, labels=("target",),
        loss=lambda m, out, t: pose_loss(out, t["target"], m.pose_alpha),
        metrics=lambda out, t, classes: pose_metrics(
            pose_expectation(out.view(-1, 3, POSE_BINS)), t["target"]),
        selection=lambda metrics, dataset: -metrics["mae_mean"],
        predict=angles_prediction, angles=True),
    # ABAW-4's multi-task challenge: expressions, valence/arousal and 12 AUs, each masked
    "mtl": Task(
        outputs=lambda classes: classes + 2 + len(AU_NAMES), labels=("target", "va", "au"),
        loss=lambda m, out, t: mtl_loss(out, t, m.num_classes, m.weights, m.mtl_weights,
                                        m.au_pos_weight),
        metrics=mtl_metrics,
        selection=lambda metrics, dataset: metrics["p_mtl"],  # at AU threshold 0.5
        predict=mtl_prediction, class_logits=lambda out, n: out[:, :n]),
}


def task_outputs(task, num_classes=None):
    """Width of the task head (TASKS[task].outputs), with a clear error for an unknown task."""
    if task not in TASKS:
        raise UnknownName("task", task, TASKS)
    return TASKS[task].outputs(num_classes)


class TaskLoss(nn.Module):
    """One task's loss with its settings, as a part of the model: the row's loss (TASKS) with
    the class weights (n_max / n_c, class_weights()), label smoothing, Hopenet's alpha, the MTL
    term weights and the AUs' positive weights. The weights follow the model to its device;
    they come from the training labels and are not saved with it."""

    def __init__(self, task="classify", num_classes=None, class_weights=None, label_smoothing=0.0,
                 pose_alpha=0.001, mtl_weights=(1.0, 1.0, 1.0), au_pos_weight=None):
        super().__init__()
        self.outputs = task_outputs(task, num_classes)
        self.task, self.num_classes = task, num_classes
        self.label_smoothing, self.pose_alpha = label_smoothing, pose_alpha
        self.mtl_weights = tuple(mtl_weights)
        for name, value in (("weights", class_weights), ("au_pos_weight", au_pos_weight)):
            self.register_buffer(name, None if value is None else
                                 torch.as_tensor(value, dtype=torch.float32), persistent=False)

    def forward(self, outputs, targets):
        """targets: {"target": class indices or (N, 3) degrees, "va": (N, 2), "au": (N, 12)},
        the keys TASKS[task].labels names."""
        return TASKS[self.task].loss(self, outputs, targets)


# ----------------------------------------------------------------------------------------------
# The Emotion-GCN head (Antoniadis, Filntisis, Maragos, FG 2021), for task "expr_va". The
# expression classifiers and the valence/arousal regressors are not free weights: a 2-layer
# graph convolutional network computes them from one embedding per label node (C expressions +
# valence + arousal), over a graph that links each expression to the affect dimensions it moves
# with in the training labels. At inference the weights are a constant, so export() folds them
# into the plain linear classifier and the head costs nothing to deploy.

HEADS = ("linear", "gcn")
GRAPH_THRESHOLD = 0.1   # an edge where |Spearman rho| >= 0.1 (the paper's threshold)
GRAPH_SELF_LOOP = 0.5   # each node keeps half of its message
NODE_EMBEDDING_WIDTH, GCN_HIDDEN = 300, 512  # GloVe's 300-d vectors; the paper's hidden width
NODE_NAMES_VA = ["valence", "arousal"]


def average_ranks(values):
    """Ranks 1..n, tied values sharing their mean rank (Spearman's convention; the expression
    indicators are nothing but ties)."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts - 1) / 2)[inverse]


def spearman(x, y):
    """Spearman's rank correlation: Pearson's on the average ranks. 0 where either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / scale) if scale > 0 else 0.0


def label_correlations(labels, va, num_classes):
    """(C+2, C+2) Spearman correlations between the C expression indicators, valence and
    arousal of a training set. A pair uses the samples where both are labelled: valence or
    arousal outside [-1, 1] is a "not available" sentinel."""
    labels, va = torch.as_tensor(labels), torch.as_tensor(va, dtype=torch.float64)
    columns = [(labels == c).double() for c in range(num_classes)] + [va[:, 0], va[:, 1]]
    everywhere = torch.ones(len(labels), dtype=torch.bool)
    labelled = [everywhere] * num_classes + [va[:, 0].abs() <= 1, va[:, 1].abs() <= 1]
    n = num_classes + 2
    rho = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            both = labelled[i] & labelled[j]
            rho[i, j] = rho[j, i] = spearman(columns[i][both], columns[j][both])
    return rho


def emotion_graph(labels, va, num_classes):
    """The adjacency A (C+2, C+2) of Emotion-GCN, computed from the training labels: an edge
    where |rho| >= 0.1, except between two expressions (mutually exclusive labels: their
    negative correlation carries no affect); A[i, i] = 0.5 and node i's other half is split
    equally among its neighbours. A node without neighbours keeps all of itself (the reference
    code divides by zero there)."""
    rho = label_correlations(labels, va, num_classes)
    edges = rho.abs() >= GRAPH_THRESHOLD
    edges[:num_classes, :num_classes] = False
    edges.fill_diagonal_(False)
    degree = edges.sum(1, keepdim=True)
    adjacency = torch.where(edges, (1 - GRAPH_SELF_LOOP) / degree.clamp(min=1), 0.0)
    adjacency.diagonal().copy_(torch.where(degree[:, 0] > 0, GRAPH_SELF_LOOP, 1.0))
    return adjacency.float()


def graph_edges(adjacency, names):
    """The graph's edges in words, for the training log: "Happy-valence, ..."."""
    n = len(names)
    return ", ".join(f"{names[i]}-{names[j]}" for i in range(n) for j in range(i + 1, n)
                     if adjacency[i, j] > 0) or "none"


def read_node_vectors(path, names):
    """One fixed embedding per label node from a word-vector text file in GloVe's format (per
    line: a word, then its numbers), looked up by the lowercased node name. The file is read
    until every name is found. One-line ValueError for a wrong path or a missing word."""
    if not os.path.isfile(path):
        raise UserError(f"node vectors {path}: no such file")
    wanted = {name.lower(): None for name in names}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            word, _, numbers = line.rstrip().partition(" ")
            if word in wanted and wanted[word] is None:
                try:
                    wanted[word] = [float(v) for v in numbers.split()]
                except ValueError:
                    raise UserError(f"{path}, line {number}: not a word followed by numbers") from None
                if all(v is not None for v in wanted.values()):
                    break
    missing = [word for word, vector in wanted.items() if not vector]
    if missing:
        raise UserError(f"{path} has no vector for {', '.join(missing)} "
                         f"(one per label node: {', '.join(wanted)})")
    widths = {len(vector) for vector in wanted.values()}
    if len(widths) > 1:
        raise UserError(f"{path}: the vectors have different widths {sorted(widths)}")
    return torch.tensor([wanted[name.lower()] for name in names], dtype=torch.float32)


class GraphHead(nn.Module):
    """Two graph convolutions from node embeddings to one weight vector per label node, of the
    encoder's feature width: W = S·LeakyReLU(S·E·W1)·W2, S the propagation matrix. Embeddings are
    learnable by default; given word vectors (the paper: GloVe), they are fixed inputs."""

    def __init__(self, adjacency, feature_width, node_vectors=None):
        super().__init__()
        # S = A: each node's new embedding is half its own plus the mean of its neighbours'.
        # The reference normalises to D^-1/2 A^T D^-1/2 = A^T (rows of A sum to 1), under which
        # valence and arousal, linked to most expressions, sum many inputs: their weight vectors
        # grew ~4x longer than the expressions' on the demo. Accuracy was alike (README).
        self.register_buffer("adjacency", torch.as_tensor(adjacency, dtype=torch.float32))
        nodes = self.adjacency.shape[0]
        if node_vectors is None:
            self.node_embeddings = nn.Parameter(torch.randn(nodes, NODE_EMBEDDING_WIDTH))
        else:
            self.register_buffer("node_vectors", torch.as_tensor(node_vectors, dtype=torch.float32))
        width = NODE_EMBEDDING_WIDTH if node_vectors is None else self.node_vectors.shape[1]
        if (nodes,) != tuple(self.adjacency.shape[1:]) or node_vectors is not None and \
                len(node_vectors) != nodes:
            raise ValueError(f"a graph of {nodes} nodes needs a square adjacency and one vector "
                             f"per node, got {tuple(self.adjacency.shape)} and "
                             f"{None if node_vectors is None else tuple(self.node_vectors.shape)}")
        self.layer1 = nn.Linear(width, GCN_HIDDEN, bias=False)
        self.layer2 = nn.Linear(GCN_HIDDEN, feature_width, bias=False)

    def node_weights(self):
        """(C+2, feature width): the expression classifiers, then valence and arousal."""
        spread = self.adjacency
        nodes = self.node_embeddings if hasattr(self, "node_embeddings") else self.node_vectors
        hidden = F.leaky_relu(spread @ self.layer1(nodes), 0.2)
        return spread @ self.layer2(hidden)


def saved_graph(state):
    """(adjacency, fixed node vectors or None) of a GCN-head model's state_dict; (None, None)
    for a linear head. The graph travels in the checkpoint, so evaluating needs no labels."""
    return state.get("graph_head.adjacency"), state.get("graph_head.node_vectors")
