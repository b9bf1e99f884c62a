"""Evaluation for every dataset of the HMTL experiments, prediction, and export.

    python eval.py --dataset affectnet --data-root ~/data/AffectNet --checkpoint runs/x/best.pt
    python eval.py --dataset ckplus --data-root ~/data/CK+ --checkpoint runs/x/best.pt   # nonlinear eval
    python eval.py --checkpoint runs/x/best.pt --predict face.jpg            # or a folder
    python eval.py --checkpoint runs/x/best.pt --export-torchscript model.pt --export-onnx model.onnx

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
import json
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import hmtl

# ----------------------------------------------------------------------------------------------
# Metrics.


# ----------------------------------------------------------------------------------------------
# Running a model over a split.


@torch.no_grad()
def predict_split(model, loader, device, channels_last=True, embed=False):
    """Task outputs over a loader on clean (unaugmented) images, with the targets; with
    `embed`, the pooled embedding instead (the encoder's feature, what downstream models train
    on). Returns (outputs, {label key: targets} with every label a batch carries ("target",
    "va", "au"), skipped)."""
    model.eval()
    outputs, targets, skipped = [], {}, []
    for batch in loader:
        skipped += batch["skipped"]
        if "image" not in batch:
            continue
        images = data.normalize(batch["image"].to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if embed:
            outputs.append(model.encoder.pool(model.encoder.forward_features(images)).float().cpu())
        else:
            outputs.append(model(images).float().cpu())
        for key in LABEL_KEYS:
            targets.setdefault(key, []).append(batch[key])
    if not outputs:
        raise RuntimeError("no sample of this split could be read")
    return torch.cat(outputs), {k: torch.cat(v) for k, v in targets.items()}, skipped


LABEL_KEYS = ("target", "va", "au")  # what a batch carries besides the images


def selection_metric(task, metrics, dataset=None):
    """The one number that picks best.pt (higher is better): hmtl.TASKS[task].selection."""
    return hmtl.TASKS[task].selection(metrics, dataset)


# ABAW-4's multi-task score, for anyone's predictions (hmtl.py holds it beside the MTL task).
p_mtl = hmtl.p_mtl


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


def curves_png(entries, path, width=720, panel=220):
    """A run at a glance, from its metrics.jsonl entries: the training loss parts (epoch means)
    and the validation metrics per epoch. A diverging run shows as a rising loss line."""
    # a resumed run logs an epoch again: its last entry counts
    epochs = list({e["epoch"]: e for e in entries if e.get("kind") == "epoch"}.values())
    vals = list({e["epoch"]: e for e in entries if e.get("kind") == "val"}.values())
    losses = {k: [(e["epoch"], e[k]) for e in epochs if k in e]
              for k in dict.fromkeys(k for e in epochs for k in e if k not in ("kind", "epoch", "step"))}
    shown = [k for k in ("accuracy", "macro_f1", "mae_mean", "ccc_valence", "ccc_arousal")
             if any(k in e for e in vals)]
    metrics = {k: [(e["epoch"], e[k]) for e in vals if k in e] for k in shown}
    image = Image.new("RGB", (width, 2 * panel + 60), "white")
    draw = ImageDraw.Draw(image)
    line_panel(draw, (10, 30, width - 10, panel + 10), losses, "training loss (mean per epoch)")
    line_panel(draw, (10, panel + 50, width - 10, 2 * panel + 50), metrics,
               f"validation ({vals[0]['split']})" if vals else "validation")
    image.save(path)
    return path


def bars_png(groups, path, title, ylabel="accuracy", bar=46, height=300):
    """Grouped bars with error bars: `groups` maps a group name to {bar name: (mean, std)}.
    The y axis runs from 0 to 1 (accuracies)."""
    names = list(dict.fromkeys(b for bars in groups.values() for b in bars))
    group_width = bar * len(names) + 40
    width = 70 + group_width * len(groups)
    image = Image.new("RGB", (max(width, 380), height + 90), "white")
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
        draw.text((x, bottom + 24), group, fill="black")
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
            draw.text((bx, bottom + 6), name, fill=colour)
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def load_checkpoint(path, device="cpu"):
    """(HMTL model with the checkpoint's weights, its config). One line when the file is not an
    HMTL checkpoint."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config, num_classes = checkpoint["config"], checkpoint["num_classes"]
        model = hmtl.model_from_config(config, num_classes, None,
                                       *hmtl.saved_graph(checkpoint["model"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError, TypeError, ValueError, EOFError) as err:
        raise SystemExit(f"error: {path} is not an HMTL checkpoint of train.py "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0][:200]})") from None
    model.classes = checkpoint.get("classes")
    return model.to(device).eval(), config


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
            images = data.normalize(batch["image"].to(device))
            features.append(encoder.pool(encoder.forward_features(images)).float().cpu())
            labels.append(batch["target"])
            subjects += [subject for _, subject in good]
    return torch.cat(features), torch.cat(labels), np.array(subjects), unreadable


def fit_head(features, targets, task="classify", classes=8, hidden=256, epochs=200, seed=0,
             lr=1e-3, weights=None, au_pos_weight=None):
    """A small head trained full-batch with Adam on frozen features, with the task's own loss
    (hmtl.TASKS): hidden > 0 gives a 2-layer MLP (ReLU, dropout 0.5), hidden = 0 a linear layer.
    `targets` as predict_split returns them ({"target", "va", "au"})."""
    torch.manual_seed(seed)
    width = hmtl.task_outputs(task, classes)
    head = torch.nn.Sequential(torch.nn.Linear(features.shape[1], hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(hidden, width)) if hidden \
        else torch.nn.Linear(features.shape[1], width)
    settings = types.SimpleNamespace(  # what a task's loss reads from its model
        weights=weights, label_smoothing=0.0, pose_alpha=hmtl.DEFAULTS["pose_alpha"],
        num_classes=classes, mtl_weights=hmtl.DEFAULTS["mtl_weights"], au_pos_weight=au_pos_weight)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        loss = hmtl.TASKS[task].loss(settings, head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def heads_on_features(train_npz, test_npz, task, hidden=(0, 256), epochs=500, lr=3e-3,
                      seeds=(0, 1, 2)):
    """The ABAW-4 MTL winners' recipe: small heads on frozen features, extracted once
    (--extract-features). Features standardised with the training set's statistics; each head
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
            results[name].append(hmtl.TASKS[task].metrics(outputs, test_targets, classes))
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
# Prediction on images, and export.


def image_paths(path):
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if f.lower().endswith(data.IMAGE_EXTENSIONS)]
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist")
    return [path]


@torch.no_grad()
def predict(model, paths, size, classes=None, device="cpu"):
    """Label and class probabilities for each image file, which should be a face crop (no
    detector here). Any mode (grey, RGBA, palette) is converted to RGB; the crop is squared and
    resized as in training. Returns [(path, label, {class: probability})]; for head pose the
    label is "yaw pitch roll" in degrees and the dict holds the three angles."""
    model.eval()
    results = []
    for path in paths:
        try:
            pixels, _ = data.load_face(data.Sample(path, 0), size, 0.0)
        except (OSError, ValueError, SyntaxError) as err:
            results.append((path, f"unreadable ({err.__class__.__name__})", {}))
            continue
        output = model(data.normalize(pixels[None].to(device))).float()[0].cpu()
        label, scores = hmtl.TASKS[model.task].predict(output, classes)
        results.append((path, label, scores))
    return results


def export_torchscript(model, path, size):
    """The deployable model (no pretext heads) traced to TorchScript: torch.jit.load(path)."""
    deployed = hmtl.export(model).cpu()
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        traced = torch.jit.trace(deployed, example)
    traced.save(path)
    return path


def export_onnx(model, path, size):
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise SystemExit("error: ONNX export needs the onnx package: pip install onnx onnxscript") from None
    deployed = hmtl.export(model).cpu()
    torch.onnx.export(deployed, (torch.zeros(1, 3, size, size),), path, input_names=["images"],
                      output_names=["outputs"], dynamic_axes={"images": {0: "batch"}})
    return path


# ----------------------------------------------------------------------------------------------


def split_loader(config, faces, split, data_root, device, batch_size, workers):
    """Clean images of a split at the run's size: the prepared cache if any, else decoded."""
    dataset = data.open_split(faces, split, config["image_size"], data_root, config.get("classes"))
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


def evaluate(model, config, faces, split, data_root, device, batch_size=128, workers=0,
             out_dir=None):
    """Run the dataset's protocol for `split`; returns the metrics (and writes the confusion
    PNG into `out_dir` for classification)."""
    size = config["image_size"]
    if faces.name == "ckplus":
        return ckplus_nonlinear(model, faces, size, device, batch_size)
    loader = split_loader(config, faces, split, data_root, device, batch_size, workers)
    outputs, targets, skipped = predict_split(model, loader, device)
    if faces.classes and model.num_classes != len(faces.classes):
        raise SystemExit(f"error: the checkpoint predicts {model.num_classes} classes, "
                         f"{faces.name} has {len(faces.classes)}")
    metrics = hmtl.TASKS[model.task].metrics(outputs, targets, faces.classes)
    metrics["skipped_unreadable"] = len(skipped)
    if out_dir and "confusion" in metrics:
        os.makedirs(out_dir, exist_ok=True)
        metrics["confusion_png"] = confusion_png(metrics["confusion"], faces.classes,
                                                 os.path.join(out_dir, f"confusion-{faces.name}-{split}.png"))
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a train.py checkpoint (best.pt)")
    parser.add_argument("--dataset", choices=list(data.READERS))
    parser.add_argument("--data-root")
    parser.add_argument("--cache-dir", help="where the prepared caches are, if not in the data root")
    parser.add_argument("--classes", type=int, help="protocol: AffectNet 8|7, CK+ 7|8")
    parser.add_argument("--split", help="default: the split the paper reports on")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="folder for the confusion-matrix PNG (default: beside the checkpoint)")
    parser.add_argument("--predict", metavar="IMAGE_OR_FOLDER", help="label face crops instead")
    parser.add_argument("--export-torchscript", metavar="PATH")
    parser.add_argument("--export-onnx", metavar="PATH")
    parser.add_argument("--extract-features", metavar="NPZ",
                        help="with --dataset: save the split's pooled embeddings and targets")
    parser.add_argument("--heads-on-features", nargs=2, metavar=("TRAIN_NPZ", "TEST_NPZ"),
                        help="train linear and MLP heads on stored features (--extract-features) "
                             "and score them; with --task")
    parser.add_argument("--task", choices=list(hmtl.TASKS), default="classify",
                        help="--heads-on-features: the task the heads learn")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.heads_on_features:
        results = heads_on_features(*args.heads_on_features, args.task)
        for name, runs in results.items():  # the number that would pick best.pt
            values = [hmtl.TASKS[args.task].selection(r, None) for r in runs]
            print(f"{name:8} {args.task} score {np.mean(values):.4f} +- "
                  f"{np.std(values, ddof=1):.4f} (seeds {', '.join(f'{v:.4f}' for v in values)})")
        if args.json:
            print(json.dumps(results, indent=1))
        return results
    if not args.checkpoint:
        parser.error("--checkpoint is required")

    device = torch.device(args.device)
    model, config = load_checkpoint(args.checkpoint, device)
    result = {}
    if args.export_torchscript:
        result["torchscript"] = export_torchscript(model, args.export_torchscript, config["image_size"])
    if args.export_onnx:
        result["onnx"] = export_onnx(model, args.export_onnx, config["image_size"])
    if args.predict:
        predictions = predict(model, image_paths(args.predict), config["image_size"],
                              model.classes, device)
        result["predictions"] = [{"image": p, "label": label, "scores": scores}
                                 for p, label, scores in predictions]
        if not args.json:
            for p, label, scores in predictions:  # the label, and the top 3 class probabilities
                ranked = sorted((kv for kv in scores.items() if kv[0] in (model.classes or ())),
                                key=lambda kv: -kv[1])[:3]
                print(f"{p}: {label}" + (f"  ({', '.join(f'{k} {v:.3f}' for k, v in ranked)})"
                                         if ranked else ""))
    if args.dataset:
        try:
            classes = args.classes or (config.get("classes") if args.dataset == config["dataset"] else None)
            faces = data.load(args.dataset, args.data_root, classes, args.cache_dir)
            data.check_cache(faces, config["image_size"], args.data_root, config.get("classes"))
        except data.DatasetError as err:
            raise SystemExit(f"error: {err}") from None
        split = args.split or faces.eval_split
        if args.extract_features:
            result["features"] = extract_features(model, config, faces, split, args.data_root,
                                                  device, args.extract_features,
                                                  args.batch_size, args.workers)
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                print(f"features: {result['features']}")
            return result
        out_dir = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        metrics = evaluate(model, config, faces, split, args.data_root, device,
                           args.batch_size, args.workers, out_dir)
        result["metrics"] = metrics
        if not args.json:
            if faces.name == "ckplus":
                print(f"ckplus ({metrics['protocol']}, {metrics['folds']} folds): accuracy "
                      f"{100 * metrics['accuracy_mean']:.2f} +- {100 * metrics['accuracy_std']:.2f} %")
            else:
                print_metrics(metrics, f"{faces.name} / {split}")
                if "confusion_png" in metrics:
                    print(f"  confusion matrix picture: {metrics['confusion_png']}")
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.export_torchscript or args.export_onnx:
        for kind in ("torchscript", "onnx"):
            if kind in result:
                print(f"exported {kind}: {result[kind]}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
