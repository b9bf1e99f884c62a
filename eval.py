"""Evaluation for every dataset of the HMTL experiments, prediction, export, and a look at the
faces the network gets. One subcommand per job:

    python eval.py score --checkpoint runs/x/best.pt --dataset affectnet --data-root ~/data/AffectNet
    python eval.py score --checkpoint runs/x/best.pt --dataset ckplus --data-root ~/data/CK+  # nonlinear
    python eval.py blend --checkpoint a.pt b.pt --dataset abaw_lsd --data-root ~/data/LSD
    python eval.py predict --checkpoint runs/x/best.pt face.jpg            # or a folder; --out F.csv
    python eval.py export --checkpoint runs/x/best.pt --pt2 model.pt2 --onnx model.onnx
    python eval.py features --checkpoint runs/x/best.pt --dataset D --data-root R --out f.npz
    python eval.py heads train.npz test.npz --task mtl      # small heads on frozen features
    python eval.py convert-hsemotion enet_b0_8_best_afew.pt enet_b0.pt --dataset affectnet
    python eval.py show --dataset fer2013 --data-root ~/data/fer2013   # faces + masks, a PNG

Protocols:
  expression, gender  accuracy, balanced accuracy (= accuracy on AffectNet's balanced
                      validation set), macro-F1, per-class recall, the confusion matrix
                      (printed with class names and drawn as a PNG); for an AffectNet-8 model
                      also the 7-class score, dropping Contempt samples and the Contempt logit
  valence/arousal     CCC and RMSE per dimension (sentinels outside [-1, 1] excluded)
  Aff-Wild2           macro-F1 over the expressions (the ABAW metric; it also picks best.pt),
                      CCC for valence and arousal, on Validation_Set
  head pose           MAE of yaw, pitch, roll and their mean, in degrees
  CK+                 the paper's "nonlinear evaluation": the encoder frozen, a small MLP trained
                      on its pooled features per fold, subject-independent 10-fold
                      cross-validation, mean +- std accuracy
"""

import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import hmtl
import models
import ssl_tasks
import tasks

# ----------------------------------------------------------------------------------------------
# Running a model over a split.


def clean_batches(model, loader, device, skipped):
    """The loader's batches with their images normalised, on the device, in the memory format of
    the model's weights (else every convolution converts); the unreadable images' entries are
    appended to `skipped`, and a batch left with no image is passed over."""
    memory_format = ssl_tasks.memory_format_of(model.encoder.features[0][0].weight)
    for batch in loader:
        skipped += batch["skipped"]
        if "image" in batch:
            images = models.normalize(batch["image"].to(device, non_blocking=True))
            yield images.contiguous(memory_format=memory_format), batch


@torch.no_grad()
def predict_split(model, loader, device, embed=False):
    """Task outputs over a loader on clean (unaugmented) images, with the targets; with
    `embed`, the pooled embedding instead (the encoder's feature, what downstream models train
    on). Returns (outputs, {label key: targets} with every label a batch carries ("target",
    "va", "au"), skipped)."""
    model.eval()
    outputs, targets, skipped = [], {}, []
    for images, batch in clean_batches(model, loader, device, skipped):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if embed:
                output = model.encoder.pool(model.encoder.forward_features(images))
            else:
                output = model(images)
        outputs.append(output.float())  # kept on the device: one copy back at the end
        for key in LABEL_KEYS:
            targets.setdefault(key, []).append(batch[key])
    if not outputs:
        raise RuntimeError("no sample of this split could be read")
    return torch.cat(outputs).cpu(), {k: torch.cat(v) for k, v in targets.items()}, skipped


LABEL_KEYS = ("target", "va", "au")  # what a batch carries besides the images


def selection_metric(task, metrics, dataset=None):
    """The one number that picks best.pt (higher is better): tasks.TASKS[task].selection."""
    return tasks.TASKS[task].selection(metrics, dataset)


# ABAW-4's multi-task score, for anyone's predictions (tasks.py holds it beside the MTL task).
p_mtl = tasks.p_mtl


# ----------------------------------------------------------------------------------------------
# Reports.


def print_metrics(metrics, title):
    print(title)
    for key in ("samples", "accuracy", "balanced_accuracy", "macro_f1", "p_mtl",
                "p_mtl_constant_baseline", "expression_f1", "au_f1", "ccc_valence",
                "ccc_arousal", "rmse_valence", "rmse_arousal", "mae_yaw", "mae_pitch",
                "mae_roll", "mae_mean"):
        if key in metrics:
            value = metrics[key]
            print(f"  {key:23} {value if isinstance(value, int) else f'{value:.4f}'}")
    if "au_f1_per_au" in metrics:
        print("  AU F1 at 0.5: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["au_f1_per_au"].items()))
        tuned = metrics["tuned_thresholds_optimistic"]
        print(f"  with per-AU thresholds tuned on this split (optimistic): P_MTL {tuned['p_mtl']:.4f}, "
              f"AU F1 {tuned['au_f1']:.4f}")
    if "seven_class" in metrics:
        seven = metrics["seven_class"]
        print(f"  7-class (Contempt dropped): accuracy {seven['accuracy']:.4f}, "
              f"macro_f1 {seven['macro_f1']:.4f} over {seven['samples']} samples")
    if "confusion" in metrics:
        classes = metrics["classes"]
        width = max(8, max(len(c) for c in classes) + 1)
        print("  recall per class: " + ", ".join(
            f"{c} {r:.3f}" for c, r in metrics["per_class_recall"].items()))
        print("  confusion (rows: true, columns: predicted)")
        print(" " * (width + 2) + "".join(f"{c[:7]:>8}" for c in classes))
        for name, row in zip(classes, metrics["confusion"]):
            print(f"  {name:{width}}" + "".join(f"{v:8d}" for v in row))


def confusion_png(confusion, classes, path, cell=56):
    """The confusion matrix as a picture: cells shaded by the row-normalised rate (recall on the
    diagonal), counts written in, class names on both axes."""
    confusion = np.asarray(confusion)
    n = len(classes)
    margin = 8 + 7 * max(len(c) for c in classes)
    image = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    rates = confusion / np.maximum(1, confusion.sum(1, keepdims=True))
    draw.text((4, 4), "rows: true class", fill="black")
    draw.text((4, 16), "columns: predicted", fill="black")
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 2 - 5), classes[i], fill="black")
        draw.text((margin + i * cell + 4, margin - 14 - 12 * (i % 2)), classes[i][:8], fill="black")
        for j in range(n):
            shade = int(255 * (1 - rates[i, j]))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255),
                           outline=(200, 200, 200))
            draw.text((x + 6, y + cell // 2 - 5), str(confusion[i, j]),
                      fill="white" if rates[i, j] > 0.5 else "black")
    image.save(path)
    return path


# Charts, drawn with Pillow alone: a run's curves, and bars with error bars for --compare.

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def line_panel(draw, box, series, title):
    """Lines on axes inside `box` (x0, y0, x1, y1): `series` maps a name to [(x, y), ...]. The
    y axis runs from 0 (or the lowest value, if negative) to the highest value."""
    x0, y0, x1, y1 = box
    points = [p for line in series.values() for p in line if math.isfinite(p[1])]
    draw.text((x0, y0 - 16), title, fill="black")
    left, bottom = x0 + 44, y1 - 18
    draw.rectangle([left, y0, x1, bottom], outline="black")
    if not points:
        draw.text((left + 8, y0 + 8), "nothing logged yet", fill="black")
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    low, high = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    first, last = min(xs), max(max(xs), min(xs) + 1)

    def at(x, y):
        return (left + (x - first) / (last - first) * (x1 - left - 8) + 4,
                bottom - (y - low) / (high - low) * (bottom - y0 - 8) - 4)

    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        y = at(first, value)[1]
        draw.line([left - 3, y, left, y], fill="black")
        draw.text((x0, y - 6), f"{value:.3g}", fill="black")
    draw.text((left, bottom + 4), f"epoch {first:g}", fill="black")
    draw.text((x1 - 60, bottom + 4), f"epoch {last:g}", fill="black")
    for k, (name, line) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        line = [at(x, y) for x, y in line if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((left + 8 + 110 * (k % 4), y0 + 6 + 14 * (k // 4)), name, fill=colour)


# what a training step logs of what it learned, and its name on the curves: the pretext's own
# score (ssl_tasks), and the task's training accuracy
PRETEXT_SCORES = {"positions_right": "puzzle right", "l1_vs_fill": "L1 / fill's L1"}
LEARNED_SCORES = {"train_accuracy": "train accuracy", **PRETEXT_SCORES}


def per_epoch(entries, kind):
    """A run's metrics.jsonl entries of one kind ("epoch", "val"), one per epoch: a resumed run
    logs an epoch again, and its last entry counts."""
    return list({e["epoch"]: e for e in entries if e.get("kind") == kind}.values())


def curves_png(entries, path, width=720, panel=220):
    """A run at a glance, from its metrics.jsonl entries: the training loss parts (epoch means)
    and the validation metrics per epoch. A diverging run shows as a rising loss line."""
    epochs, vals = per_epoch(entries, "epoch"), per_epoch(entries, "val")
    losses = {k: [(e["epoch"], e[k]) for e in epochs if k in e]
              for k in dict.fromkeys(k for e in epochs for k in e
                                     if k not in ("kind", "epoch", "step", *LEARNED_SCORES))}
    shown = [k for k in ("accuracy", "macro_f1", "mae_mean", "ccc_valence", "ccc_arousal")
             if any(k in e for e in vals)]
    # beside validation, what training learned: whether the task overfit, whether the pretext
    # task was learned at all
    metrics = {**{k: [(e["epoch"], e[k]) for e in vals if k in e] for k in shown},
               **{LEARNED_SCORES[k]: [(e["epoch"], e[k]) for e in epochs if k in e]
                  for k in LEARNED_SCORES if any(k in e for e in epochs)}}
    image = Image.new("RGB", (width, 2 * panel + 60), "white")
    draw = ImageDraw.Draw(image)
    line_panel(draw, (10, 30, width - 10, panel + 10), losses, "training loss (mean per epoch)")
    line_panel(draw, (10, panel + 50, width - 10, 2 * panel + 50), metrics,
               (f"validation ({vals[0]['split']})" if vals else "validation")
               + ", training accuracy and the pretext's score (epoch means)")
    image.save(path)
    return path


def bars_png(groups, path, title, ylabel="accuracy", bar=46, height=300):
    """Grouped bars with error bars: `groups` maps a group name to {bar name: (mean, std)}.
    The y axis runs from 0 to 1 (accuracies)."""
    names = list(dict.fromkeys(b for bars in groups.values() for b in bars))
    group_width = bar * len(names) + 40
    width = 70 + group_width * len(groups)
    image = Image.new("RGB", (max(width, 380), height + 80 + 14 * len(names)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    top, bottom, left = 40, 40 + height, 60

    def y_of(value):
        return bottom - value * height

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([left - 4, y_of(tick), width - 10, y_of(tick)], fill=(225, 225, 225))
        draw.text((left - 40, y_of(tick) - 6), f"{tick:.2f}", fill="black")
    draw.text((4, top - 20), ylabel, fill="black")
    for g, (group, bars) in enumerate(groups.items()):
        x = left + 20 + g * group_width
        draw.text((x, bottom + 6), group, fill="black")
        for k, name in enumerate(names):
            if name not in bars:
                continue
            mean, std = bars[name]
            colour = COLOURS[k % len(COLOURS)]
            bx = x + k * bar
            draw.rectangle([bx, y_of(mean), bx + bar - 8, bottom], fill=colour)
            centre = bx + (bar - 8) / 2
            for y in (y_of(mean - std), y_of(mean + std)):
                draw.line([centre - 6, y, centre + 6, y], fill="black", width=2)
            draw.line([centre, y_of(mean - std), centre, y_of(mean + std)], fill="black", width=2)
            draw.text((bx, y_of(mean + std) - 14), f"{mean:.3f}", fill="black")
    for k, name in enumerate(names):  # the legend: long variant names would overlap under the bars
        draw.rectangle([left, bottom + 30 + 14 * k, left + 10, bottom + 40 + 14 * k],
                       fill=COLOURS[k % len(COLOURS)])
        draw.text((left + 16, bottom + 28 + 14 * k), name, fill="black")
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Checkpoints.


class EvalError(data.UserError):
    """What eval.py was asked cannot be done: one line, printed by __main__."""


class CheckpointError(EvalError):
    """A file that is not a train.py checkpoint, or is missing. Its message is one line."""


def load_checkpoint(path, device="cpu"):
    """(HMTL model with the checkpoint's weights, its config), in eval mode, its weights
    channels_last. The model carries `classes` (the names, in its logits' order) and
    `image_size`. Raises CheckpointError, with a one-line message, when the file is missing
    or is not an HMTL checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config, num_classes = checkpoint["config"], checkpoint["num_classes"]
        classes = checkpoint.get("classes") or [str(c) for c in range(num_classes or 0)]
        model = hmtl.build(config, classes, None, *tasks.saved_graph(checkpoint["model"]))
        hmtl.load_state(model, checkpoint["model"])
    except (KeyError, RuntimeError, TypeError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path} is not an HMTL checkpoint of train.py "
                              f"({err.__class__.__name__}: {str(err).splitlines()[0][:200]})") from None
    model.classes = checkpoint.get("classes")  # a checkpoint without names keeps none
    return model.to(device, memory_format=torch.channels_last).eval(), config


# ----------------------------------------------------------------------------------------------
# CK+ nonlinear evaluation (the paper's protocol for CK+): the encoder trained elsewhere
# (AffectNet) is frozen; a small MLP is trained on its pooled features, per fold.


@torch.no_grad()
def pooled_features(encoder, faces, size, device, batch_size=64):
    """Frozen-encoder embeddings of every readable image of CK+'s "all" split, with their
    labels and subjects. Returns (features, labels, subjects, unreadable count)."""
    encoder.eval()
    samples = faces.splits["all"]
    dataset = data.FaceDataset(faces, "all", size)
    features, labels, subjects, unreadable = [], [], [], 0
    for start in range(0, len(dataset), batch_size):
        chunk = [(dataset[i], samples[i].subject) for i in range(start, min(len(dataset), start + batch_size))]
        good = [(item, subject) for item, subject in chunk if "error" not in item]
        unreadable += len(chunk) - len(good)
        if good:
            batch = data.collate([item for item, _ in good])
            images = models.normalize(batch["image"].to(device))
            features.append(encoder.pool(encoder.forward_features(images)).float().cpu())
            labels.append(batch["target"])
            subjects += [subject for _, subject in good]
    return torch.cat(features), torch.cat(labels), np.array(subjects), unreadable


def fit_head(features, targets, task="classify", classes=8, hidden=256, epochs=200, seed=0,
             lr=1e-3, weights=None, au_pos_weight=None):
    """A small head trained full-batch with Adam on frozen features, with the task's own loss
    (tasks.TaskLoss): hidden > 0 gives a 2-layer MLP (ReLU, dropout 0.5), hidden = 0 a linear
    layer. `targets` as predict_split returns them ({"target", "va", "au"})."""
    torch.manual_seed(seed)
    task_loss = tasks.TaskLoss(task, classes, weights, au_pos_weight=au_pos_weight)
    head = torch.nn.Sequential(torch.nn.Linear(features.shape[1], hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(hidden, task_loss.outputs)) \
        if hidden else torch.nn.Linear(features.shape[1], task_loss.outputs)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        loss = task_loss(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def heads_on_features(train_npz, test_npz, task, hidden=(0, 256), epochs=500, lr=3e-3,
                      seeds=(0, 1, 2)):
    """The ABAW-4 MTL winners' recipe: small heads on frozen features, extracted once
    (eval.py features). Features standardised with the training set's statistics; each head
    trained on train_npz and scored on test_npz with the task's metrics; both heads get the same
    epochs and learning rate. Returns {head: [metrics per seed]}."""
    def load(path):
        stored = np.load(path)
        targets = {k: torch.from_numpy(stored[k]) for k in ("target", "va", "au") if k in stored}
        return torch.from_numpy(stored["features"]).float(), targets, list(stored["classes"])
    features, targets, classes = load(train_npz)
    test_features, test_targets, _ = load(test_npz)
    mean, std = features.mean(0), features.std(0) + 1e-6
    results = {}
    for width in hidden:
        name = f"mlp {width}" if width else "linear"
        results[name] = []
        for seed in seeds:
            head = fit_head((features - mean) / std, targets, task, len(classes), width, epochs,
                            seed, lr)
            with torch.no_grad():
                outputs = head((test_features - mean) / std)
            results[name].append(tasks.TASKS[task].metrics(outputs, test_targets, classes))
    return results


def ckplus_nonlinear(model, faces, size, device, batch_size=64, epochs=200):
    """Per fold: standardise the features with the training folds' statistics, fit the MLP on
    the training folds, test on the held-out subjects. Mean and std over folds."""
    features, labels, subjects, unreadable = pooled_features(model.encoder, faces, size, device,
                                                             batch_size)
    accuracies = []
    for fold, fold_subjects in enumerate(faces.folds):
        test = torch.from_numpy(np.isin(subjects, fold_subjects))
        if test.sum() == 0 or (~test).sum() == 0:
            continue  # fewer subjects than folds
        mean, std = features[~test].mean(0), features[~test].std(0) + 1e-6
        mlp = fit_head((features[~test] - mean) / std, {"target": labels[~test]}, "classify",
                       len(faces.classes), 256, epochs, seed=fold)
        with torch.no_grad():
            predicted = mlp((features[test] - mean) / std).argmax(1)
        accuracies.append(float((predicted == labels[test]).float().mean()))
    return {"protocol": "nonlinear, subject-independent folds", "folds": len(accuracies),
            "fold_accuracy": accuracies, "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)), "samples": int(len(labels)),
            "skipped_unreadable": unreadable}


# ----------------------------------------------------------------------------------------------
# Other label sets. Datasets name the same expressions differently (AffectNet "Happy", RAF-DB
# "Happiness", FER+ "happiness", the ABAW LSD folders "ANGRER"); a classifier can be scored on
# any dataset whose classes are a subset of its own, by name, keeping only their logits.

CLASS_SYNONYMS = {"happy": "happiness", "sad": "sadness", "angry": "anger", "angrer": "anger",
                  "surprised": "surprise"}


def class_key(name):
    name = name.strip().lower()
    return CLASS_SYNONYMS.get(name, name)


def match_classes(own, wanted):
    """For each class of `wanted`, the index of the same class in `own` (by name, case and the
    usual synonyms aside). Returns (indices, the names of `own` left out); raises ValueError,
    naming them, when some of `wanted` are not in `own`."""
    keys = [class_key(c) for c in own]
    missing = [c for c in wanted if class_key(c) not in keys]
    if missing:
        raise ValueError(f"the model has no class {', '.join(missing)} (its classes: {', '.join(own)})")
    indices = [keys.index(class_key(c)) for c in wanted]
    return indices, [c for i, c in enumerate(own) if i not in indices]


def keep_classes(outputs, indices, num_classes):
    """Outputs whose first `num_classes` columns are class logits (classify, expr_va, mtl) ->
    only the logits at `indices`, in that order, then the other columns as they were."""
    return torch.cat([outputs[:, indices], outputs[:, num_classes:]], 1)


def blend_logits(first, second, weight):
    """The blend of the ABAW LSD winners (HSEmotion, Savchenko 2022): weight · first + (1 − weight) · second."""
    return weight * first + (1 - weight) * second


def sweep_blend(first, second, targets, task, classes, dataset, weights=None):
    """Score every blend weight (0, 0.1, ..., 1 by default) by the dataset's selection metric.
    Returns (best weight, its metrics, {weight: score}). Picked on the split it is scored on,
    the best score is optimistic."""
    weights = weights or [round(0.1 * k, 1) for k in range(11)]
    scores, best = {}, None
    for weight in weights:
        metrics = tasks.TASKS[task].metrics(blend_logits(first, second, weight), targets, classes)
        scores[weight] = tasks.TASKS[task].selection(metrics, dataset)
        if best is None or scores[weight] > best[1]:
            best = (weight, scores[weight], metrics)
    return best[0], best[2], scores


# HSEmotion's files are whole timm modules pickled with torch.save (they need a matching timm
# to unpickle), their classes in alphabetical order (HSEmotion's README), 10-output models adding
# valence and arousal at the end.
HSEMOTION_CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness",
                     "Surprise"]
NATIVE_CLASSES = {"affectnet": data.AFFECTNET_CLASSES, "rafdb": data.RAFDB_CLASSES,
                  "fer2013": data.FER2013_CLASSES, "ferplus": data.FERPLUS_CLASSES,
                  "abaw_lsd": data.ABAW_LSD_CLASSES, "demo": data.AFFECTNET_CLASSES}


def convert_hsemotion(path, out, dataset="affectnet", classes=None):
    """Unpickle an HSEmotion model (with timm installed) and save it as a plain timm state_dict
    at `out`, its classifier's rows in `dataset`'s native class order (classes it lacks are
    dropped), with a JSON beside it (classes, arch, tf_variant, size, task), and as an HMTL
    checkpoint (OUT.hmtl.pt) that eval.py and eval.predict use as it is. Then
    `python train.py --init timm:OUT --tf-variant` starts from it."""
    try:
        import timm  # noqa: F401  (unpickling the module needs its classes)
    except ImportError:
        raise EvalError("converting an HSEmotion file needs timm: pip install timm") from None
    if not os.path.exists(path):
        raise EvalError(f"{path} does not exist")
    print(f"unpickling {path}: this runs code stored in the file; convert only files you trust",
          flush=True)
    module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "conv_stem"):
        raise EvalError(f"{path} is not a pickled timm EfficientNet (got {type(module).__name__})")
    state = module.state_dict()
    outputs = state["classifier.weight"].shape[0]
    source = {7: [c for c in HSEMOTION_CLASSES if c != "Contempt"], 8: HSEMOTION_CLASSES,
              10: HSEMOTION_CLASSES}.get(outputs)
    if source is None:
        raise EvalError(f"{path} has {outputs} outputs; HSEmotion's have 7, 8 or 10")
    wanted = NATIVE_CLASSES[dataset]
    wanted = wanted[:classes] if classes else wanted
    try:
        indices, dropped = match_classes(source, wanted)
    except ValueError as err:
        raise EvalError(f"{path}: {err}") from None
    rows = indices + ([8, 9] if outputs == 10 else [])  # valence, arousal stay last
    state["classifier.weight"] = state["classifier.weight"][rows].clone()
    state["classifier.bias"] = state["classifier.bias"][rows].clone()
    arch = {1280: "b0", 1408: "b2"}.get(state["conv_head.weight"].shape[0])
    tf_variant = abs(module.bn1.eps - 1e-3) < 1e-9
    note = {"source": os.path.abspath(path), "classes": wanted, "dropped": dropped, "arch": arch,
            "tf_variant": tf_variant, "image_size": {"b0": 224, "b2": 260}.get(arch),
            "task": "expr_va" if outputs == 10 else "classify",
            "checkpoint": os.path.splitext(out)[0] + ".hmtl.pt"}
    state = {k: v.contiguous() for k, v in state.items()}
    torch.save(state, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(note, f, indent=1)
    # and the same network as an HMTL checkpoint, to score or use as it is (eval.py
    # --checkpoint, eval.predict): the LSD recipe's "pretrained, untrained" model
    # Its configuration: every setting hmtl.build reads, as facts of this network (no pretext
    # task, no loss settings: it was trained elsewhere), so eval.py needs nothing of train.py.
    config = dict(dataset=dataset, classes=len(wanted), task=note["task"], head="linear", arch=arch,
                  tf_variant=tf_variant, image_size=note["image_size"], init=f"timm:{out}",
                  ssl="none", lambda_ssl=0.0, task_weight=1.0, view="shared", label_smoothing=0.0,
                  pose_alpha=0.0, mtl_weights=[1.0, 1.0, 1.0], dropout=None, stochastic_depth=None)
    model = hmtl.build(config, wanted)
    models.load_timm_weights(model.encoder, state)
    torch.save({"model": model.state_dict(), "config": config, "num_classes": len(wanted),
                "classes": wanted}, note["checkpoint"])
    print(f"saved {out} ({arch}, classes {', '.join(wanted)}"
          + (f"; dropped {', '.join(dropped)}" if dropped else "") + f"), and {note['checkpoint']} "
          f"for eval.py score and predict; train from it with: "
          f"python train.py --init timm:{out} --arch {arch}{' --tf-variant' if tf_variant else ''} "
          f"--image-size {note['image_size']} --task {note['task']}")
    return note


# ----------------------------------------------------------------------------------------------
# Prediction on images, and export.


def image_paths(path):
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if f.lower().endswith(data.IMAGE_EXTENSIONS)]
    if not os.path.exists(path):
        raise EvalError(f"{path} does not exist")
    return [path]


def face_pixels(image, size):
    """One input of `predict` -> uint8 (3, size, size) RGB. A file path, a PIL image or an
    H×W×3 uint8 RGB array goes through the training crop (data.load_face: the whole image,
    resized with PIL's bilinear filter); a 3×H×W tensor (uint8 0–255, or float 0–1) is resized
    on its device. Raises ValueError (or what PIL raises for a corrupt file) for what it cannot
    read."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3×H×W RGB tensor, got shape {tuple(image.shape)}")
        return tensor_pixels(image[None], size)[0]
    if isinstance(image, np.ndarray) and (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3):
        raise ValueError(f"expected an H×W×3 uint8 RGB array, got {image.dtype} {image.shape}")
    if not isinstance(image, (str, os.PathLike, np.ndarray, Image.Image)):
        raise ValueError(f"cannot read a {type(image).__name__} as an image")
    pixels, _ = data.load_face(data.Sample(os.fspath(image) if isinstance(image, os.PathLike)
                                           else image, 0), size, 0.0)
    return pixels


def tensor_pixels(images, size):
    """B×3×H×W uint8 (0–255) or float (0–1) RGB -> float 0–255 at size×size: the whole image
    resized, antialiased like PIL's bilinear filter."""
    pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, (size, size), mode="bilinear", align_corners=False,
                               antialias=True).clamp(0, 255)
    return pixels


@torch.no_grad()
def predict(model, images, batch_size=64):
    """Predictions for face crops (no detector here), in batches on the model's device (bf16
    autocast on CUDA). The colour order is RGB everywhere.

    `images` is one of: a list of file paths, of PIL images (any mode; converted to RGB), or
    of H×W×3 uint8 RGB arrays; a B×3×H×W tensor, uint8 in 0–255 or float in 0–1. Each face is
    resized to the model's size as in training (the whole image, stretched if not square).

    Returns one dict per input, in order: "label" and "logits" (the head's raw outputs) for
    every task; a classifier adds "probabilities" by class name, in the checkpoint's class
    order (the logits' order); valence/arousal adds "valence" and "arousal" (in (-1, 1)); head
    pose "yaw", "pitch" and "roll" in degrees; the multi-task head also "action_units" (each
    AU's probability) and "active_action_units" (at 0.5). An input that cannot be read gives
    {"error": why} and the rest of its batch goes on."""
    model.eval()
    device = next(model.parameters()).device
    size, classes = getattr(model, "image_size", None), getattr(model, "classes", None)
    if size is None:
        raise ValueError("the model does not say its image size: load it with eval.load_checkpoint")
    task = tasks.TASKS[model.task]
    batched = isinstance(images, torch.Tensor)
    if batched and (images.dim() != 4 or images.shape[1] != 3):
        raise ValueError(f"expected a B×3×H×W RGB tensor, got shape {tuple(images.shape)}")
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        errors = {}
        if batched:
            pixels = tensor_pixels(chunk.to(device, non_blocking=True), size)
        else:
            readable = []
            for i, image in enumerate(chunk):
                try:
                    readable.append(face_pixels(image, size).to(device))
                except (OSError, ValueError, SyntaxError) as err:
                    errors[i] = f"unreadable ({err.__class__.__name__}: {str(err)[:120]})"
            pixels = torch.stack(readable) if readable else None
        outputs = []
        if pixels is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                outputs = model(models.normalize(pixels)).float().cpu()
        rows = iter(outputs)
        for i in range(len(chunk)):
            if i in errors:
                results.append({"error": errors[i]})
                continue
            row = next(rows)
            results.append({**task.predict(row, classes), "logits": row.tolist()})
    return results


def flat_prediction(prediction):
    """One prediction as a CSV row's fields: the nested parts spread out by name."""
    flat = {}
    for key, value in prediction.items():
        if key in ("probabilities", "action_units"):
            flat.update(value)
        elif key == "logits":
            flat.update({f"logit_{i}": v for i, v in enumerate(value)})
        elif key == "active_action_units":
            flat[key] = " ".join(value)
        else:
            flat[key] = value
    return flat


def write_predictions(predictions, path):
    """eval.py predict's output file: JSON (a list of objects) or CSV (one row per image), by suffix."""
    if path.lower().endswith(".json"):
        with open(path, "w") as f:
            json.dump(predictions, f, indent=1)
        return path
    rows = [flat_prediction(p) for p in predictions]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


class Deployable(torch.nn.Module):
    """What the exported files hold: RGB floats in [0, 1], B×3×H×W at the model's size ->
    ImageNet normalisation -> the deployable encoder and task head (hmtl.export: no pretext
    head) -> the head's raw outputs, as `predict`'s "logits"."""

    def __init__(self, model):
        super().__init__()
        self.network = hmtl.export(model).to("cpu", memory_format=torch.contiguous_format)
        # normalize()'s constants are made once and kept: made here, not while torch.export
        # traces forward (where they would be fake tensors, kept for every later call)
        models.normalize(torch.zeros(1, 3, 1, 1))

    def forward(self, images):
        return self.network(models.normalize(images * 255))


def export_description(model):
    """What a user of an exported file needs to read its outputs (saved beside or inside it)."""
    width = tasks.task_outputs(model.task, model.num_classes)
    return {"task": model.task, "classes": list(model.classes or []), "image_size": model.image_size,
            "input": f"images: B×3×{model.image_size}×{model.image_size} float32, RGB in [0, 1] "
                     "(normalised inside)",
            "outputs": f"B×{width} raw head outputs; " + EXPORT_OUTPUTS[model.task]}


EXPORT_OUTPUTS = {  # how each task's raw outputs read (tasks.TASKS[task].predict does it in Python)
    "classify": "softmax gives the probabilities of `classes`, in that order",
    "va": "tanh of the two gives valence and arousal",
    "expr_va": "the first len(classes) are the class logits; tanh of the last two gives valence "
               "and arousal",
    "pose": f"yaw, pitch and roll logits over {tasks.POSE_BINS} bins each (3 × {tasks.POSE_BINS}); "
            "each angle is the softmax-weighted mean of the bin centres, tasks.pose_bin_centres()",
    "mtl": "the first len(classes) are the expression logits, then valence and arousal (tanh), "
           f"then the logits of the 12 action units {', '.join(data.AU_NAMES)} (sigmoid)",
}


def export_inputs(model):
    """What both exporters trace with: two RGB images at the model's size (a batch size that
    torch.export does not specialise on: 0 and 1 are special-cased) and the batch axis marked
    dynamic. Returns (args, dynamic_shapes)."""
    return ((torch.rand(2, 3, model.image_size, model.image_size),),
            ({0: torch.export.Dim("batch", min=1)},))


def export_program(model, path):
    """torch.export's program, with a dynamic batch axis, saved as a .pt2 file (load with
    torch.export.load(path).module()), and its description in a .json beside it."""
    deployable = Deployable(model).eval()
    inputs, dynamic_shapes = export_inputs(model)
    program = torch.export.export(deployable, inputs, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(export_description(model), f, indent=1)
    return path


def export_onnx(model, path):
    """ONNX (torch's dynamo exporter, dynamic batch axis; input "images", output "outputs");
    the description (classes, task, input, outputs) in the file's metadata_props."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as err:
        raise EvalError(f"ONNX export needs the {err.name} package: "
                         "pip install onnx onnxscript") from None
    deployable = Deployable(model).eval()
    inputs, dynamic_shapes = export_inputs(model)
    torch.onnx.export(deployable, inputs, path, input_names=["images"], output_names=["outputs"],
                      dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, verbose=False)
    exported = onnx.load(path)
    for key, value in export_description(model).items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(exported, path)
    return path


# ----------------------------------------------------------------------------------------------


def split_loader(config, faces, split, data_root, device, batch_size, workers, rank=0, world=1):
    """Clean images of a split at the run's size: the prepared cache if any, else decoded.
    With `world` processes, this rank's share: every world-th image from `rank` on."""
    dataset = data.open_split(faces, split, config["image_size"], data_root)
    if world > 1:
        dataset = data.open_split(faces, split, config["image_size"], data_root,
                                  range(rank, len(dataset), world))
    return data.make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")


def extract_features(model, config, faces, split, data_root, device, path, batch_size=128,
                     workers=0):
    """Save the pooled embeddings of a split with their targets to an .npz (features, target,
    va, classes), e.g. to train a small model on per-frame features, as HSEmotion does."""
    loader = split_loader(config, faces, split, data_root, device, batch_size, workers)
    features, targets, skipped = predict_split(model, loader, device, embed=True)
    np.savez(path, features=features.numpy(), **{k: v.numpy() for k, v in targets.items()},
             classes=np.array(faces.classes or []))
    return {"path": path, "samples": len(features), "width": features.shape[1],
            "skipped_unreadable": len(skipped)}


def split_outputs(model, config, faces, split, data_root, device, batch_size=128, workers=0,
                  rank=0, world=1):
    """The model's outputs over a split, its targets, how many images were unreadable, and the
    model's classes left out (a model scored on a dataset with a subset of its classes keeps
    only their logits, in the dataset's order: match_classes). With `world` processes, each
    runs its share and every rank gets all of them (a collective: every rank calls it)."""
    loader = split_loader(config, faces, split, data_root, device, batch_size, workers, rank, world)
    outputs, targets, skipped = predict_split(model, loader, device)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (outputs, targets, skipped))
        outputs = torch.cat([share[0] for share in shares])
        targets = {k: torch.cat([share[1][k] for share in shares]) for k in targets}
        skipped = [entry for share in shares for entry in share[2]]
    dropped = []
    if faces.classes and (model.classes or []) != faces.classes:
        if not model.classes:  # a checkpoint without names: only the count can be checked
            if model.num_classes != len(faces.classes):
                raise EvalError(f"the checkpoint predicts {model.num_classes} classes, "
                                 f"{faces.name} has {len(faces.classes)}")
        else:
            try:
                indices, dropped = match_classes(model.classes, faces.classes)
            except ValueError as err:
                raise EvalError(f"{faces.name}: {err}") from None
            outputs = keep_classes(outputs, indices, len(model.classes))
    return outputs, targets, len(skipped), dropped


def evaluate(model, config, faces, split, data_root, device, batch_size=128, workers=0,
             out_dir=None, rank=0, world=1):
    """Run the dataset's protocol for `split`; returns the metrics (and writes the confusion
    PNG into `out_dir` for classification). With `world` processes, each runs its share of the
    images and every rank gets the metrics over all of them."""
    if faces.name == "ckplus":
        return ckplus_nonlinear(model, faces, config["image_size"], device, batch_size)
    outputs, targets, skipped, dropped = split_outputs(model, config, faces, split, data_root,
                                                       device, batch_size, workers, rank, world)
    metrics = tasks.TASKS[model.task].metrics(outputs, targets, faces.classes)
    metrics["skipped_unreadable"] = skipped
    if dropped:
        metrics["model_classes_dropped"] = dropped
    if out_dir and "confusion" in metrics:
        os.makedirs(out_dir, exist_ok=True)
        metrics["confusion_png"] = confusion_png(metrics["confusion"], faces.classes,
                                                 os.path.join(out_dir, f"confusion-{faces.name}-{split}.png"))
    return metrics


@torch.no_grad()
def reestimate_batchnorm(model, config, faces, data_root, device, batch_size=128, workers=0):
    """Replace the encoder's BatchNorm running statistics by those of the clean training faces
    the run trained on (all of them for a semi-supervised run): no label is read and no weight
    changes. In training, BatchNorm normalised pretext-transformed faces (all of them in the
    shared view, half of each batch in the separate view) and the test sees clean ones; scoring
    before and after measures what that mismatch costs. Returns the number of faces used and
    of those skipped as unreadable."""
    fraction = 1.0 if config.get("semi_supervised") else config.get("train_fraction", 1.0)
    dataset = data.training_faces_used(faces, config["image_size"], data_root, fraction)
    loader = data.make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout and stochastic depth off; BatchNorm alone in training mode
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
        m.train()
    seen, skipped = 0, []
    try:
        for images, _ in clean_batches(model, loader, device, skipped):
            model.encoder.forward_features(images)
            seen += len(images)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise EvalError("no training face could be read to re-estimate BatchNorm")
    return seen, len(skipped)


def blend(model, config, args, faces, split, device):
    """Both checkpoints over the split (each at its own image size), their logits restricted
    to the dataset's classes, blended at the weight asked for, or at every weight."""
    other, other_config = load_checkpoint(args.other, device)
    if not faces.classes or other.task != model.task or model.task not in ("classify", "expr_va"):
        raise EvalError("a blend needs two classifiers (or two expr_va models) of the same "
                        "task, on a dataset with classes")
    runs = [split_outputs(m, c, faces, split, args.data_root, device, args.batch_size, args.workers)
            for m, c in ((model, config), (other, other_config))]
    (first, targets, skipped, _), (second, _, skipped_other, _) = runs
    if skipped or skipped_other:
        raise EvalError(f"{skipped + skipped_other} unreadable images: the two models' "
                        f"outputs would not line up")
    weights = [args.weight] if args.weight is not None else None
    weight, metrics, scores = sweep_blend(first, second, targets, model.task, faces.classes,
                                          faces.name, weights)
    alone = {name: scores[w] for name, w in (("checkpoint_alone", 1.0), ("other_alone", 0.0))
             if w in scores}
    summary = {"weight": weight, "optimistic": weights is None, "scores_by_weight": scores, **alone,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if not args.json:
        label = ("best weight, picked on this split (optimistic)" if weights is None
                 else "weight given")
        print(f"blend on {faces.name} / {split}: {weight} · {args.checkpoint} + {1 - weight:.1f} · "
              f"{args.other} ({label})")
        print("  score by weight: " + ", ".join(f"{w} {v:.4f}" for w, v in scores.items()))
        print_metrics(metrics, "  the blend at that weight")
    return summary


# ----------------------------------------------------------------------------------------------
# Where data meets the method: the in-painting regions of a dataset's faces, and a picture of
# them (python eval.py show), to look at before a long run.


def region_layout(faces, size=128):
    """(layout, where it comes from) for the in-painting masks of the faces without landmarks:
    the dataset's own five points (an alignment template, its crop geometry, its measured
    points), else the median boxes of its training landmarks, else ssl_tasks' default for
    detector crops."""
    if faces.five_points is not None:
        return ssl_tasks.five_point_layout(faces.five_points), f"{faces.name}'s crop layout"
    landmarks = data.sample_landmarks(faces, size=size)
    if landmarks is not None:
        return ssl_tasks.median_layout(landmarks, size), f"measured on {faces.name}'s training landmarks"
    return dict(ssl_tasks.CANONICAL_BOXES), "the default for detector crops (no landmarks, no template)"


REGION_COLOURS = {"right_eye": (0, 170, 255), "left_eye": (0, 90, 255), "right_brow": (255, 210, 0),
                  "left_brow": (255, 130, 0), "nose": (0, 200, 80), "mouth": (235, 40, 70)}


def training_faces(faces, split="train"):
    """(split, the indices of its faces to draw from). CK+ ships no training split, only
    subject-independent folds: there, the training faces of fold 1 (the other folds' subjects)."""
    if faces.splits.get(split):
        return split, list(range(len(faces.splits[split])))
    if split == "train" and faces.folds and faces.splits.get("all"):
        held_out = set(faces.folds[0])
        return "all", [i for i, s in enumerate(faces.splits["all"]) if s.subject not in held_out]
    raise data.DatasetError(f"{faces.name} has no {split!r} split to show")


def contact_sheet(faces, path, split="train", size=128, count=12, level="weak", grid=3, seed=0):
    """One PNG to look at before a long run: `count` training faces exactly as the network gets
    them (cropped, resized, augmented at `level`), each with the in-painting regions outlined
    (from its landmarks, else from the dataset's layout) beside its puzzled version, with the
    label. Returns what it drew (boxes in pixels, landmarks after augmentation, the layout's
    source), so that a test can check that the masks sit on the parts they name."""
    split, candidates = training_faces(faces, split)
    generator = torch.Generator().manual_seed(seed)
    picks = [candidates[i] for i in torch.randperm(len(candidates), generator=generator)[:2 * count].tolist()]
    items = [data.FaceDataset(faces, split, size, picks)[i] for i in range(len(picks))]
    good = [item for item in items if "error" not in item][:count]
    if not good:
        raise data.DatasetError(f"{faces.name}/{split}: none of {len(items)} faces tried could be read")
    batch = data.collate(good)
    images, landmarks, _ = data.augment(batch["image"], level, batch["landmarks"], generator=generator)
    pixels = models.denormalize(images).clamp(0, 255).round()
    puzzled, _ = ssl_tasks.puzzle(pixels, grid, generator)
    layout, source = region_layout(faces, size)
    has = batch["has_landmarks"]
    boxes = ssl_tasks.region_boxes(len(good), size, size, landmarks, has, jitter=0.0, layout=layout)
    per_row, gap, caption = 4, 6, 16
    rows = math.ceil(len(good) / per_row)
    sheet = Image.new("RGB", (per_row * (2 * size + 3 * gap), 24 + rows * (size + caption + gap)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 6), f"{faces.name}/{split}: augment {level}, puzzle {grid}x{grid}; regions of "
                        f"faces without landmarks: {source}", fill=(0, 0, 0))
    for k in range(len(good)):
        x = gap + (k % per_row) * (2 * size + 3 * gap)
        y = 24 + (k // per_row) * (size + caption + gap)
        for offset, tile in ((0, pixels[k]), (size + gap, puzzled[k])):
            sheet.paste(Image.fromarray(tile.permute(1, 2, 0).to(torch.uint8).numpy()), (x + offset, y))
        for region, box in zip(ssl_tasks.REGIONS, boxes[k].tolist()):
            x0, y0, x1, y1 = box
            draw.rectangle((x + x0, y + y0, x + x1 - 1, y + y1 - 1), outline=REGION_COLOURS[region])
        target = good[k]["target"]
        label = (faces.classes[int(target)] if faces.task == "classify" else
                 "yaw {:.0f} pitch {:.0f} roll {:.0f}".format(*target.tolist()) if faces.task == "pose"
                 else "valence {:.2f} arousal {:.2f}".format(*good[k]["va"].tolist()))
        where = "landmarks" if bool(has[k]) else "layout"
        draw.text((x, y + size + 2), f"{label} ({where})", fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return {"path": path, "boxes": boxes, "landmarks": landmarks, "has_landmarks": has,
            "source": source, "samples": len(good), "unreadable": len(items) - len([
                item for item in items if "error" not in item])}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    data.check_command(argv, "eval.py")
    args = parser().parse_args(argv)
    result = COMMANDS[args.command](args)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return result


def parser():
    """eval.py's command line: one subcommand per job (COMMANDS runs each)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text, checkpoint=True, dataset=False):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if checkpoint:
            sub.add_argument("--checkpoint", required=True, help="a train.py checkpoint (best.pt)")
            sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if dataset:
            sub.add_argument("--dataset", required=True, help=f"one of {', '.join(data.READERS)}")
            sub.add_argument("--data-root")
            sub.add_argument("--cache-dir", help="where the prepared caches are, if not in the data root")
            sub.add_argument("--classes", type=int, help="protocol: AffectNet 8|7, CK+ 7|8")
            sub.add_argument("--split", help="default: the split the dataset's papers report on")
            sub.add_argument("--batch-size", type=int, default=128)
            sub.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        return sub

    score = command("score", "score a checkpoint with the dataset's protocol", dataset=True)
    score.add_argument("--out", help="folder for the confusion-matrix PNG (default: beside the checkpoint)")
    score.add_argument("--reestimate-bn", action="store_true",
                       help="score, re-estimate the BatchNorm statistics on the run's clean "
                            "training faces (no label used, no weight changed), score again")
    blend_ = command("blend", "score weight·checkpoint + (1 − weight)·OTHER over the dataset's "
                              "classes; without --weight, every weight 0, 0.1, ..., 1 (the best is "
                              "optimistic: picked on the split it scores)", dataset=True)
    blend_.add_argument("other", metavar="OTHER.pt")
    blend_.add_argument("--weight", type=float, help="the checkpoint's weight")
    predict_ = command("predict", "label face crops (one image or a folder)")
    predict_.add_argument("images", metavar="IMAGE_OR_FOLDER")
    predict_.add_argument("--batch-size", type=int, default=128)
    predict_.add_argument("--out", metavar="FILE.csv|FILE.json", help="also write the predictions there")
    export = command("export", "the deployable model (no pretext head) as files")
    export.add_argument("--pt2", metavar="FILE.pt2", help="torch.export (+ FILE.json: classes, inputs, outputs)")
    export.add_argument("--onnx", metavar="FILE.onnx", help="ONNX, the description in its metadata")
    features = command("features", "save a split's pooled embeddings and targets (.npz)", dataset=True)
    features.add_argument("--out", required=True, metavar="FILE.npz")
    heads = command("heads", "train linear and MLP heads on stored features and score them",
                    checkpoint=False)
    heads.add_argument("train_npz", metavar="TRAIN.npz")
    heads.add_argument("test_npz", metavar="TEST.npz")
    heads.add_argument("--task", choices=list(tasks.TASKS), default="classify")
    convert = command("convert-hsemotion", "unpickle an HSEmotion model (runs code from the "
                                           "file; needs timm) and save a plain timm state_dict "
                                           "for train.py --init timm:OUT.pt, its classes in the "
                                           "dataset's order", checkpoint=False)
    convert.add_argument("source", metavar="HSEMOTION.pt")
    convert.add_argument("out", metavar="OUT.pt")
    convert.add_argument("--dataset", default="affectnet", choices=sorted(NATIVE_CLASSES))
    convert.add_argument("--classes", type=int, help="keep the first N of the dataset's classes")
    show = command("show", "training faces as the network gets them, with the in-painting "
                           "regions and the puzzle drawn on them: one PNG", checkpoint=False)
    show.add_argument("--dataset", default="demo", help=f"one of {', '.join(data.READERS)}")
    show.add_argument("--data-root")
    show.add_argument("--classes", type=int, help="protocol: AffectNet 8|7, CK+ 7|8")
    show.add_argument("--size", type=int, default=128)
    show.add_argument("--count", type=int, default=12, help="faces on the sheet")
    show.add_argument("--augment", default="weak", choices=list(data.AUGMENT_LEVELS))
    show.add_argument("--out", help="the PNG to write (default: <dataset>-show.png)")
    return parser


def score_command(args):
    model, config, faces, split = checkpoint_and_data(args)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    before = None
    if args.reestimate_bn:
        if faces.name != config["dataset"]:
            raise EvalError(f"--reestimate-bn uses the training faces of the run's own dataset "
                            f"({config['dataset']}), not {faces.name}")
        before = evaluate(model, config, faces, split, args.data_root, model_device(model),
                          args.batch_size, args.workers)
        used, unreadable = reestimate_batchnorm(model, config, faces, args.data_root, model_device(model),
                                                args.batch_size, args.workers)
    metrics = evaluate(model, config, faces, split, args.data_root, model_device(model),
                       args.batch_size, args.workers, out)
    if before is not None:
        key = tasks.TASKS[model.task].selection
        metrics["before_bn_reestimation"] = {k: v for k, v in before.items() if isinstance(v, float)}
        metrics["bn_reestimated_on"], metrics["bn_skipped_unreadable"] = used, unreadable
        if not args.json:
            print(f"BatchNorm statistics re-estimated on {used} clean training faces"
                  f"{f' ({unreadable} unreadable, skipped)' if unreadable else ''}: score "
                  f"{key(before, faces.name):.4f} before, {key(metrics, faces.name):.4f} after")
    if not args.json:
        if faces.name == "ckplus":
            print(f"ckplus ({metrics['protocol']}, {metrics['folds']} folds): accuracy "
                  f"{100 * metrics['accuracy_mean']:.2f} +- {100 * metrics['accuracy_std']:.2f} %")
        else:
            print_metrics(metrics, f"{faces.name} / {split}")
            if "confusion_png" in metrics:
                print(f"  confusion matrix picture: {metrics['confusion_png']}")
    return {"metrics": metrics}


def blend_command(args):
    model, config, faces, split = checkpoint_and_data(args)
    return {"blend": blend(model, config, args, faces, split, model_device(model))}


def features_command(args):
    model, config, faces, split = checkpoint_and_data(args)
    result = extract_features(model, config, faces, split, args.data_root, model_device(model),
                              args.out, args.batch_size, args.workers)
    if not args.json:
        print(f"features: {result}")
    return {"features": result}


def predict_command(args):
    model, _ = load_checkpoint(args.checkpoint, torch.device(args.device))
    paths = image_paths(args.images)
    predictions = [{"image": path, **p} for path, p in zip(paths, predict(model, paths, args.batch_size))]
    if args.out:
        write_predictions(predictions, args.out)
    if not args.json:
        for p in predictions:  # the label, the top 3 class probabilities, VA, AUs
            ranked = sorted(p.get("probabilities", {}).items(), key=lambda kv: -kv[1])[:3]
            extra = [f"{k} {v:.3f}" for k, v in ranked] + \
                [f"{k} {p[k]:.3f}" for k in ("valence", "arousal") if k in p]
            if "active_action_units" in p:
                extra.append("AUs: " + (" ".join(p["active_action_units"]) or "none"))
            print(f"{p['image']}: {p.get('label', p.get('error'))}"
                  + (f"  ({', '.join(extra)})" if extra else ""))
        if args.out:
            print(f"predictions written to {args.out}")
    return {"predictions": predictions, **({"predictions_file": args.out} if args.out else {})}


def export_command(args):
    if not (args.pt2 or args.onnx):
        raise EvalError("say what to write: --pt2 FILE.pt2, --onnx FILE.onnx, or both")
    model, _ = load_checkpoint(args.checkpoint, torch.device(args.device))
    result = {}
    if args.pt2:
        result["export"] = export_program(model, args.pt2)
    if args.onnx:
        result["onnx"] = export_onnx(model, args.onnx)
    if not args.json:
        for kind, path in result.items():
            print(f"exported {kind}: {path}")
    return result


def heads_command(args):
    results = heads_on_features(args.train_npz, args.test_npz, args.task)
    if not args.json:
        for name, runs in results.items():  # the number that would pick best.pt
            values = [tasks.TASKS[args.task].selection(r, None) for r in runs]
            print(f"{name:8} {args.task} score {np.mean(values):.4f} +- "
                  f"{np.std(values, ddof=1):.4f} (seeds {', '.join(f'{v:.4f}' for v in values)})")
    return results


def convert_command(args):
    return convert_hsemotion(args.source, args.out, args.dataset, args.classes)


def show_command(args):
    faces = data.load(args.dataset, args.data_root, args.classes)
    shown = contact_sheet(faces, args.out or f"{args.dataset}-show.png", size=args.size,
                          count=args.count, level=args.augment)
    print(f"wrote {shown['path']}: {shown['samples']} faces; regions without landmarks "
          f"from {shown['source']}")
    return shown


def checkpoint_and_data(args):
    """The checkpoint's model, its config, the dataset read (its prepared cache checked at the
    model's size) and the split to score: the one the dataset's papers report, by default."""
    model, config = load_checkpoint(args.checkpoint, torch.device(args.device))
    classes = args.classes or (config.get("classes") if args.dataset == config["dataset"] else None)
    faces = data.load(args.dataset, args.data_root, classes, args.cache_dir)
    data.check_cache(faces, config["image_size"], args.data_root)
    return model, config, faces, args.split or faces.eval_split


def model_device(model):
    return next(model.parameters()).device


COMMANDS = {"score": score_command, "blend": blend_command, "predict": predict_command,
            "export": export_command, "features": features_command, "heads": heads_command,
            "convert-hsemotion": convert_command, "show": show_command}


if __name__ == "__main__":
    try:
        main()
    except data.UserError as err:  # what was asked cannot be done: one line, no traceback
        sys.exit(f"error: {err}")
