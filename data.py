"""Every dataset of the HMTL experiments, read in the layout its owners distribute.

Point `--data-root` at the folder you downloaded; nothing needs converting. Each reader returns
a `FaceData`: the class names in the dataset's native order, and per split a list of `Sample`s
plus a count of the rows it skipped, by reason (a missing file, a malformed row, a label
outside the protocol, a degenerate box...). Nothing is dropped silently: `python data.py
summary` prints those counts, and a corrupt image met during training is skipped and counted
by `collate`.

The path from disk to the GPU:
  FaceDataset     decode -> crop the face box (with a margin, squared, padded at the border) ->
                  resize to `size` -> uint8 tensor, landmarks moved into the crop
  prepare()       the same, once, into a memory-mapped uint8 cache (`python data.py prepare`)
  CachedDataset   reads whole batches from that cache: no decoding during training
  augment()       the augmentation levels none/weak/strong, batched on the device; moves
                  landmarks with the image and flips head-pose labels

    python data.py summary --dataset affectnet --data-root ~/data/AffectNet [--json] [--verify]
    python data.py prepare --dataset affectnet --data-root ~/data/AffectNet --size 224
    python data.py layout --dataset fer2013 --data-root ~/data/fer2013    # where the parts sit

This file describes faces (labels, boxes, landmarks, where a dataset's crops put the eyes and
mouth) and knows nothing of the method: ssl_tasks.py turns that geometry into masked regions,
and `python eval.py show` draws both on real faces.
"""

import argparse
import atexit
import csv
import difflib
import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import types
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import models  # normalize() and device_constant(): the network's input, made on its device

# ----------------------------------------------------------------------------------------------
# What a reader produces.


@dataclass
class Sample:
    """One face. `image` is a file path, or a uint8 array (FER2013 ships pixels in its CSV).
    `target` is a class index, or [yaw, pitch, roll] in degrees for head pose. `box` is the
    face box (x0, y0, x1, y1) in image pixels, None for an image that is already a face crop.
    `landmarks` (68, 2) in image pixels, or None. `va` = (valence, arousal) where the dataset
    has them (AffectNet; -2 = not available). `subject` identifies the person (CK+ folds)."""
    image: object
    target: object
    box: tuple = None
    landmarks: np.ndarray = None
    va: tuple = None
    subject: str = None
    au: tuple = None               # 12 action units (AU_NAMES order), 1/0, -1 = unlabelled


@dataclass
class FaceData:
    name: str
    task: str                      # "classify", "pose", or "va" (Aff-Wild2's VA frames)
    classes: list                  # class names in the dataset's own order; None for pose
    splits: dict                   # split name -> [Sample]
    skipped: dict                  # split name -> Counter(reason -> rows)
    eval_split: str                # the split a paper reports on
    margin: float = 0.1            # face-box margin used when cropping
    folds: list = None             # CK+: the subjects of each cross-validation fold
    five_points: tuple = None      # crops without landmarks: where the eye centres, nose tip
                                   # and mouth corners sit, (x, y) as fractions of the crop
    cache_root: str = None         # --cache-dir: where prepared caches go (None: see cache_dir)
    fingerprints: dict = field(default_factory=dict, repr=False)  # split -> split_fingerprint
    labels: tuple = ("target",)    # what its samples carry: "target", "va", "au" (-1 / -5: missing)
    note: str = None               # what a user must know about this copy's protocol (logged)

    def counts(self, split):
        """Samples per class (classification) in `split`."""
        counts = Counter(s.target for s in self.splits[split])
        return [counts.get(c, 0) for c in range(len(self.classes))]


class UserError(ValueError):
    """Something asked for cannot be done (a missing folder, an unknown name, a checkpoint of
    another model): the message is the one line to show. Every `__main__` prints it as
    "error: ..." and exits; library code never exits."""


class DatasetError(UserError):
    """A missing root or a layout that matches nothing."""


class UnknownName(UserError):
    """A mistyped name (a dataset, a recipe, a task...), with the closest valid ones."""

    def __init__(self, kind, name, known):
        close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        super().__init__(f"unknown {kind} {name!r}; {hint}choose from {', '.join(known)}")


# ABAW's 12 action units, in the order Aff-Wild2's annotation files write them.
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26")


def require_dir(path, what):
    if not os.path.isdir(path):
        raise DatasetError(f"{what}: expected a folder at {path}, found none")
    return path


def find(root, pattern, what, depth=4, required=True):
    """The shallowest match of a glob `pattern` under `root` (archives nest folders
    differently; never hard-code the depth). `root` may also be the matched folder itself: users
    point --data-root at the folder an archive unpacked to (300W_LP/) or at its parent, and both
    must work. If none: one DatasetError line saying what was expected, or None when not
    `required`."""
    require_dir(root, what)
    root = os.path.normpath(root)
    itself = [hit for hit in glob.glob(os.path.join(os.path.dirname(root), pattern))
              if os.path.normpath(hit) == root or os.path.normpath(hit).startswith(root + os.sep)]
    if itself:
        return sorted(itself)[0]
    for level in range(depth + 1):
        hits = sorted(glob.glob(os.path.join(root, *["*"] * level, pattern)))
        if hits:
            return hits[0]
    if required:
        raise DatasetError(f"{what}: no {pattern} found within {depth} folders below {root}")
    return None


def text_lines(path, what):
    """The lines of a label file, read as bytes and decoded one by one, so that a damaged line
    (bytes that are not UTF-8) arrives as text with U+FFFD in it, fails its row's checks and is
    counted, instead of a UnicodeDecodeError ending the run. A file whose first line cannot be
    decoded is not a label file at all: one DatasetError line naming the file and the byte.
    CRLF and a UTF-8 byte-order mark are handled here, once for every reader."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            if number == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DatasetError(f"{what}: {path} is not a text label file (byte "
                                       f"0x{raw[error.start]:02x} at offset {error.start} is not "
                                       f"UTF-8)") from None
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


# ----------------------------------------------------------------------------------------------
# AffectNet. Original release: Manually_Annotated_file_lists/{training,validation}.csv with the
# columns subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks (136
# floats joined by ';'), expression, valence, arousal. validation.csv is the test set.

AFFECTNET_CLASSES = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger",
                     "Contempt"]
AFFECTNET_OTHER = {8: "None", 9: "Uncertain", 10: "Non-Face"}


def read_affectnet(root, classes=8):
    """AffectNet, 8-class (expression <= 7) or 7-class (Contempt dropped as well)."""
    if classes not in (7, 8):
        raise DatasetError(f"AffectNet protocols are 7 or 8 classes, not {classes}")
    require_dir(root, "AffectNet")
    if find(root, "training.csv", "AffectNet", required=False):
        splits, skipped = read_affectnet_csv(root, classes)
    elif find(root, os.path.join("train_set", "annotations"), "AffectNet", required=False):
        splits, skipped = read_affectnet_npy(root, classes)
    else:
        raise DatasetError(f"AffectNet: expected Manually_Annotated_file_lists/training.csv "
                           f"(original release) or train_set/annotations/ (later release) "
                           f"below {root}, found neither")
    # validation.csv is AffectNet's test set (the official one was never released); a test.csv
    # beside it (the demo's) is reported on instead, and validation.csv only selects models
    return FaceData("affectnet", "classify", AFFECTNET_CLASSES[:classes], splits, skipped,
                    "test" if "test" in splits else "val", labels=("target", "va"))


def affectnet_protocol(expression, classes):
    """None if the label is in the protocol, else the skip reason."""
    if 0 <= expression < classes:
        return None
    name = (AFFECTNET_OTHER.get(expression) or
            (AFFECTNET_CLASSES[expression] if 0 <= expression < 8 else None))
    if name is None:
        return f"expression {expression} is not an AffectNet code"
    return f"not in the {classes}-class protocol: {name}"


def read_affectnet_csv(root, classes):
    lists = os.path.dirname(find(root, "training.csv", "AffectNet"))
    rows = {}
    for split, filename in (("train", "training.csv"), ("val", "validation.csv"),
                            ("test", "test.csv")):
        path = os.path.join(lists, filename)
        if split == "test" and not os.path.exists(path):
            continue  # AffectNet ships no test list; the demo writes one in the same format
        if not os.path.exists(path):
            raise DatasetError(f"AffectNet: expected {path} beside training.csv")
        rows[split] = list(csv.reader(text_lines(path, "AffectNet")))
    image_root = affectnet_image_root(root, rows)
    splits, skipped = {}, {}
    for split, table in rows.items():
        samples, reasons = [], Counter()
        if table and table[0] and table[0][0].strip() == "subDirectory_filePath":
            table = table[1:]  # one of the two files may lack its header
        for row in table:
            sample, reason = parse_affectnet_row(row, image_root, classes)
            if reason:
                reasons[reason] += 1
            else:
                samples.append(sample)
        splits[split], skipped[split] = samples, reasons
    return splits, skipped


def affectnet_image_root(root, rows):
    """The folder that the CSV's relative paths start from. Archives put the images under
    Manually_Annotated_Images/, sometimes twice nested, sometimes under Manually_Annotated/:
    try every candidate folder on the first rows until one holds the files."""
    candidates = [root] + [d for level in range(1, 4) for d in sorted(
        glob.glob(os.path.join(root, *["*"] * (level - 1), "Manually_Annotated*")))
        if os.path.isdir(d)]
    probes = [r[0] for table in rows.values() for r in table[:50]
              if r and r[0] != "subDirectory_filePath"]
    for candidate in candidates:
        if any(os.path.exists(os.path.join(candidate, p)) for p in probes):
            return candidate
    raise DatasetError(f"AffectNet: none of the images named in the CSVs (e.g. {probes[:1]}) "
                       f"exists below {root} (looked in {len(candidates)} folders)")


def parse_affectnet_row(row, image_root, classes):
    """(Sample, None) or (None, skip reason) for one CSV row."""
    if len(row) != 9:
        return None, f"malformed row ({len(row)} fields, expected 9)"
    try:
        x, y, w, h = (float(v) for v in row[1:5])
        expression = int(float(row[6]))
        valence, arousal = float(row[7]), float(row[8])
    except ValueError:
        return None, "malformed row (non-numeric field)"
    reason = affectnet_protocol(expression, classes)
    if reason:
        return None, reason
    if w <= 0 or h <= 0:
        return None, "degenerate face box (width or height <= 0)"
    path = os.path.join(image_root, row[0])
    if not os.path.exists(path):
        return None, "image file missing"
    return Sample(path, expression, (x, y, x + w, y + h), parse_landmarks(row[5]),
                  (valence, arousal)), None


def parse_landmarks(text):
    """136 floats joined by ';' (x0;y0;x1;y1;...) -> (68, 2) float32, or None when malformed
    (the sample is kept; only landmark-based masks fall back to canonical boxes)."""
    try:
        values = np.array([float(v) for v in text.split(";") if v.strip()], dtype=np.float32)
    except ValueError:
        return None
    return values.reshape(68, 2) if values.size == 136 else None


def read_affectnet_npy(root, classes):
    """The later release: {train,val}_set/images/<id>.jpg with annotations/<id>_exp.npy,
    _val.npy, _aro.npy, _lnd.npy (0-d values; 136 landmark values). Images are face crops."""
    splits, skipped = {}, {}
    for split, folder in (("train", "train_set"), ("val", "val_set")):
        base = find(root, folder, "AffectNet")
        images = os.path.join(base, "images")
        annotations = os.path.join(base, "annotations")
        require_dir(images, f"AffectNet {folder}")
        samples, reasons = [], Counter()
        for name in sorted(os.listdir(images)):
            stem = os.path.splitext(name)[0]
            try:
                expression = int(np.load(os.path.join(annotations, f"{stem}_exp.npy")))
                valence = float(np.load(os.path.join(annotations, f"{stem}_val.npy")))
                arousal = float(np.load(os.path.join(annotations, f"{stem}_aro.npy")))
            except (OSError, ValueError, EOFError):
                reasons["annotation file missing or unreadable"] += 1
                continue
            reason = affectnet_protocol(expression, classes)
            if reason:
                reasons[reason] += 1
                continue
            landmarks = None
            try:
                values = np.load(os.path.join(annotations, f"{stem}_lnd.npy")).astype(np.float32)
                landmarks = values.reshape(68, 2) if values.size == 136 else None
            except (OSError, ValueError, EOFError):
                pass
            samples.append(Sample(os.path.join(images, name), expression, None, landmarks,
                                  (valence, arousal)))
        splits[split], skipped[split] = samples, reasons
    return splits, skipped


# ----------------------------------------------------------------------------------------------
# CK+: cohn-kanade-images/S005/001/S005_001_00000001.png, Emotion/S005/001/..._emotion.txt (one
# float such as "   3.0000000e+00"), optional Landmarks/S005/001/..._landmarks.txt (68 "x y").
# Protocol: the last 3 frames of each labelled sequence take its label; optionally the first
# frame of each labelled sequence as neutral. Evaluation: subject-independent 10-fold CV.

CKPLUS_CODES = ["neutral", "anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"]


def read_ckplus(root, classes=7, neutral_first_frame=None, frames_per_sequence=3, folds=10):
    """classes=7: the 6 basic expressions + contempt (codes 1..7); classes=8 adds neutral from
    each labelled sequence's first frame."""
    if classes not in (7, 8):
        raise DatasetError(f"CK+ protocols are 7 or 8 classes, not {classes}")
    neutral = classes == 8 if neutral_first_frame is None else neutral_first_frame
    label_file = find(root, os.path.join("Emotion", "S*", "*", "*_emotion.txt"), "CK+", depth=2,
                      required=False)
    if label_file is None:
        if find(root, os.path.join("[a-z]*", "S*_*_*.png"), "CK+", depth=2, required=False):
            return read_ckplus48(root, classes, folds)
        raise DatasetError(f"CK+: expected Emotion/S*/*/*_emotion.txt (the original release) or "
                           f"CK+48's <emotion>/S*_*_*.png below {root}, found neither")
    emotion_root = os.path.dirname(os.path.dirname(os.path.dirname(label_file)))
    base = os.path.dirname(emotion_root)
    images_root = os.path.join(base, "cohn-kanade-images")
    require_dir(images_root, "CK+ images (cohn-kanade-images)")
    names = CKPLUS_CODES if classes == 8 else CKPLUS_CODES[1:]
    offset = 0 if classes == 8 else 1
    samples, reasons = [], Counter()
    for label_file in sorted(glob.glob(os.path.join(emotion_root, "S*", "*", "*_emotion.txt"))):
        subject, sequence = label_file.split(os.sep)[-3:-1]
        try:
            with open(label_file) as f:
                code = int(round(float(f.read().split()[0])))
        except (ValueError, IndexError, OSError):
            reasons["unreadable emotion label file"] += 1
            continue
        if not 1 <= code <= 7:
            reasons[f"emotion code {code} outside 1..7"] += 1
            continue
        frames = sorted(glob.glob(os.path.join(images_root, subject, sequence, "*.png")))
        if len(frames) < frames_per_sequence + (1 if neutral else 0):
            reasons["sequence folder missing or too short"] += 1
            continue
        chosen = [(f, code - offset) for f in frames[-frames_per_sequence:]]
        if neutral:
            chosen.append((frames[0], 0))
        for frame, label in chosen:
            # CK+ frames are 640x490 with no face box: the landmark box (moved up for the
            # forehead) when Landmarks/ is there, else the whole frame
            landmarks = read_ckplus_landmarks(base, subject, sequence, frame)
            box = None if landmarks is None else landmark_box(landmarks, upward=0.1)
            samples.append(Sample(frame, label, box, landmarks, subject=subject))
    fold_subjects = subject_folds(samples, folds)
    return FaceData("ckplus", "classify", names, {"all": samples}, {"all": reasons}, "all",
                    margin=0.2, folds=fold_subjects)


def class_folder_images(base, index_of, reasons, known):
    """(class index, image path) for the images in base/<class>/, in name order; the class from
    the folder's lower-cased name through `index_of`. Another folder's images are counted in
    `reasons`, as not one of `known`."""
    for folder in sorted(os.listdir(base)):
        path = os.path.join(base, folder)
        if not os.path.isdir(path) or folder == CACHE_FOLDER:
            continue
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if folder.lower() not in index_of:
            reasons[f"folder {folder!r} is not one of {known}"] += len(files)
            continue
        yield from ((index_of[folder.lower()], os.path.join(path, f)) for f in files)


def read_ckplus48(root, classes, folds):
    """CK+48, the copy of CK+ that most people have: <emotion>/S005_001_00000011.png, 48x48 grey
    crops of the last 3 frames of each of the 327 labelled sequences, one folder per class, no
    landmarks and no neutral frames. The subject is the file name's first field, so the folds
    stay subject-independent."""
    if classes == 8:
        raise DatasetError("CK+48 has no neutral frames: use the 7-class protocol (--classes 7)")
    base = os.path.dirname(os.path.dirname(find(root, os.path.join("[a-z]*", "S*_*_*.png"), "CK+48",
                                                depth=2)))
    names = CKPLUS_CODES[1:]
    samples, reasons = [], Counter()
    for label, path in class_folder_images(base, {n: k for k, n in enumerate(names)}, reasons,
                                           "CK+'s 7 emotions"):
        fields = os.path.splitext(os.path.basename(path))[0].split("_")
        if len(fields) != 3 or not fields[0].startswith("S") or not all(
                f.isdigit() for f in (fields[0][1:], fields[1], fields[2])):
            reasons["file name is not S<subject>_<sequence>_<frame>"] += 1
            continue
        samples.append(Sample(path, label, subject=fields[0]))
    return FaceData("ckplus", "classify", names, {"all": samples}, {"all": reasons}, "all",
                    margin=0.0, folds=subject_folds(samples, folds), five_points=TIGHT_CROP_FIVE_POINTS)


def read_ckplus_landmarks(base, subject, sequence, frame):
    stem = os.path.splitext(os.path.basename(frame))[0]
    path = os.path.join(base, "Landmarks", subject, sequence, f"{stem}_landmarks.txt")
    try:
        values = np.loadtxt(path, dtype=np.float32)
    except (OSError, ValueError):
        return None
    return values.reshape(68, 2) if values.size == 136 else None


def subject_folds(samples, folds):
    """Subject-independent folds: every subject in exactly one fold. Deterministic: subjects
    sorted by image count (then name), each given to the fold with the fewest images so far."""
    per_subject = Counter(s.subject for s in samples)
    assignment = [[] for _ in range(folds)]
    sizes = [0] * folds
    for subject, count in sorted(per_subject.items(), key=lambda kv: (-kv[1], kv[0])):
        fold = sizes.index(min(sizes))
        assignment[fold].append(subject)
        sizes[fold] += count
    return [sorted(f) for f in assignment]


# ----------------------------------------------------------------------------------------------
# Head pose. 300W-LP ({AFW,HELEN,IBUG,LFPW}[_Flip]/*.jpg + same-stem .mat) and AFLW2000
# (image00002.jpg + .mat). Pose_Para = [pitch, yaw, roll, tdx, tdy, tdz, scale] in radians;
# everyone reorders to [yaw, pitch, roll] in degrees and keeps |angle| <= 99.

POSE_LIMIT = 99.0


def load_mat(path):
    """MATLAB v5 file -> dict. scipy is the one optional dependency, needed only here."""
    try:
        import scipy.io
    except ImportError:
        raise DatasetError("head-pose .mat labels need scipy: pip install scipy") from None
    return scipy.io.loadmat(path)


def read_pose_mat(image_path, test):
    """(Sample, None) or (None, reason) for one image + .mat pair."""
    mat_path = os.path.splitext(image_path)[0] + ".mat"
    if not os.path.exists(mat_path):
        return None, "label .mat missing"
    try:
        mat = load_mat(mat_path)
    except DatasetError:  # scipy missing: the whole dataset needs it
        raise
    except Exception:  # scipy's MatReadError, zlib.error, struct.error, ValueError... on a
        return None, "unreadable or damaged .mat"  # damaged file: one skip, not the end
    try:
        pitch, yaw, roll = np.degrees(np.asarray(mat["Pose_Para"], dtype=np.float64).ravel()[:3])
        points = mat["pt3d_68"][:2] if "pt3d_68" in mat else mat["pt2d"]
        points = np.asarray(points, dtype=np.float32).T  # (68, 2)
    except (KeyError, ValueError, TypeError, IndexError):
        return None, "unreadable or damaged .mat"
    if max(abs(yaw), abs(pitch), abs(roll)) > POSE_LIMIT:
        return None, f"angle beyond ±{POSE_LIMIT:.0f}°"
    valid = points[(points >= 0).all(1)]  # AFLW2000's pt2d marks invalid points as negative
    if len(valid) < 2:
        return None, "no valid landmarks for the face box"
    # the usual crops: test a fixed 0.2 margin; train 0.3 (the middle of the random 0.2-0.4
    # others draw; augmentation adds the scale jitter) with the box moved up for the forehead
    box = square_box(landmark_box(valid, upward=0.0 if test else 0.1), 0.2 if test else 0.3)
    return Sample(image_path, [float(yaw), float(pitch), float(roll)], box,
                  points if len(valid) == 68 else None), None


def landmark_box(points, upward=0.0):
    """Bounding box of the landmarks, shifted up by `upward` of its height: the 68 points stop
    at the brows, the forehead is above them."""
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    shift = upward * (y1 - y0)
    return (float(x0), float(y0 - shift), float(x1), float(y1 - shift))


def read_pose_folder(root, name, pattern, test):
    require_dir(root, name)
    samples, reasons = [], Counter()
    images = sorted(glob.glob(os.path.join(root, pattern)))
    if not images:
        raise DatasetError(f"{name}: no {pattern} images below {root}")
    for image in images:
        sample, reason = read_pose_mat(image, test)
        if reason:
            reasons[reason] += 1
        else:
            samples.append(sample)
    return samples, reasons


def read_300w_lp(root):
    """300W-LP for training; AFLW2000 as the test split when it sits beside it under the root."""
    base = find(root, "300W_LP", "300W-LP")
    train, train_skipped = read_pose_folder(base, "300W-LP", os.path.join("*", "*.jpg"), False)
    splits, skipped = {"train": train}, {"train": train_skipped}
    # AFLW2000 is optional (training alone is fine): below the root, or beside 300W_LP/ when the
    # root is that folder itself
    aflw_root = root if find(root, "image0*.jpg", "AFLW2000", required=False) else None
    if aflw_root is None and os.path.normpath(base) == os.path.normpath(root) and \
            find(os.path.dirname(os.path.abspath(root)), os.path.join("*", "image0*.jpg"),
                 "AFLW2000", depth=0, required=False):
        aflw_root = os.path.dirname(os.path.abspath(root))
    if aflw_root:
        aflw = read_aflw2000(aflw_root)
        splits["test"], skipped["test"] = aflw.splits["test"], aflw.skipped["test"]
    return FaceData("300w_lp", "pose", None, splits, skipped,
                    "test" if "test" in splits else "val", margin=0.0)


def read_aflw2000(root):
    base = os.path.dirname(find(root, "image0*.jpg", "AFLW2000"))
    samples, reasons = read_pose_folder(base, "AFLW2000", "image*.jpg", True)
    return FaceData("aflw2000", "pose", None, {"test": samples}, {"test": reasons}, "test",
                    margin=0.0)


# BIWI Kinect Head Pose: 01..24/frame_NNNNN_rgb.png + frame_NNNNN_pose.txt (a 3x3 rotation
# matrix, a blank line, the head centre in mm in the *depth* camera's frame). The frames are not
# face crops and the database gives no face box, so the box is the head centre projected into
# the RGB image, sized for a 240 mm head (our choice). Each folder's rgb.cal holds the RGB
# camera: intrinsics K (3 lines), a blank, the distortion, a blank, the rotation R (3 lines), a
# blank, the translation T (mm), a blank, the image size. The centre in RGB pixels is
# K·(R·X + T); ignoring R and T moves it by 10-15 px. Without rgb.cal: the commonly used
# intrinsics and no depth-to-RGB offset.

BIWI_INTRINSICS = np.array([[517.679, 0, 320.0], [0, 517.679, 240.5], [0, 0, 1]])
BIWI_HEAD_MM = 240.0


def rotation_to_angles(rotation):
    """BIWI's rotation matrix -> [yaw, pitch, roll] in degrees, as the public BIWI loaders do
    (the matrix is transposed first)."""
    r = np.asarray(rotation, dtype=np.float64).T
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    yaw = -math.degrees(math.atan2(-r[2, 0], math.hypot(r[2, 1], r[2, 2])))
    roll = -math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return [yaw, pitch, roll]


def read_biwi_calibration(folder):
    """(K, R, T) of the folder's RGB camera from rgb.cal; the defaults when there is none;
    None when it is there but damaged."""
    path = os.path.join(folder, "rgb.cal")
    if not os.path.exists(path):
        return BIWI_INTRINSICS, np.eye(3), np.zeros(3)
    try:
        blocks, block = [], []
        for line in text_lines(path, "BIWI rgb.cal"):
            if line.strip():
                block.append([float(v) for v in line.split()])
            elif block:
                blocks.append(block)
                block = []
        blocks += [block] if block else []
        intrinsics, _distortion, rotation, translation = blocks[:4]
        k, r, t = np.array(intrinsics), np.array(rotation), np.array(translation).ravel()
        if k.shape != (3, 3) or r.shape != (3, 3) or t.shape != (3,):
            return None
        return k, r, t
    except (ValueError, IndexError, DatasetError):
        return None


def read_biwi(root):
    base = os.path.dirname(os.path.dirname(find(root, os.path.join("[0-2][0-9]", "frame_*_pose.txt"),
                                                "BIWI", depth=3)))
    samples, reasons = [], Counter()
    for folder in sorted(glob.glob(os.path.join(base, "[0-2][0-9]"))):
        pose_files = sorted(glob.glob(os.path.join(folder, "frame_*_pose.txt")))
        calibration = read_biwi_calibration(folder)
        if calibration is None:
            reasons["rgb.cal of the folder damaged (expected K, distortion, R, T)"] += len(pose_files)
            continue
        k, r, t = calibration
        for pose_file in pose_files:
            image = pose_file.replace("_pose.txt", "_rgb.png")
            try:
                with open(pose_file) as f:
                    values = np.array(f.read().split(), dtype=np.float64)
            except (ValueError, OSError):
                reasons["unreadable pose file"] += 1
                continue
            if values.size != 12 or values[11] <= 0:
                reasons["malformed pose file (expected 9 + 3 numbers)"] += 1
                continue
            rotation, centre = values[:9].reshape(3, 3), values[9:12]
            if not os.path.exists(image):
                reasons["image file missing"] += 1
                continue
            angles = rotation_to_angles(rotation)
            if max(abs(a) for a in angles) > POSE_LIMIT:
                reasons[f"angle beyond ±{POSE_LIMIT:.0f}°"] += 1
                continue
            in_rgb = r @ centre + t  # the head centre in the RGB camera's frame, mm
            if in_rgb[2] <= 0:
                reasons["head centre behind the RGB camera"] += 1
                continue
            u, v, _ = k @ (in_rgb / in_rgb[2])
            half = k[0, 0] * BIWI_HEAD_MM / in_rgb[2] / 2
            samples.append(Sample(image, angles, (u - half, v - half, u + half, v + half),
                                  subject=os.path.basename(folder)))
    return FaceData("biwi", "pose", None, {"test": samples}, {"test": reasons}, "test", margin=0.0)


# ----------------------------------------------------------------------------------------------
# Gender. CelebA: img_align_celeba/*.jpg, list_attr_celeba.txt (count; 40 attribute names;
# "name v1 ... v40" with 1/-1), list_eval_partition.txt ("name split": 0 train, 1 val, 2 test).
# UTKFace: [age]_[gender]_[race]_[datetime].jpg, gender 0 male / 1 female, no official split.

CELEBA_CLASSES = ["female", "male"]
CELEBA_BOX = (0, 20, 178, 198)  # the aligned 178x218 images: the centred square holding the face


def read_celeba(root, attribute="Male"):
    attributes_file = find(root, "list_attr_celeba.txt", "CelebA")
    images = os.path.dirname(find(root, os.path.join("img_align_celeba", "*.jpg"), "CelebA"))
    partition_file = find(root, "list_eval_partition.txt", "CelebA")
    lines = list(text_lines(attributes_file, "CelebA"))
    names = lines[1].split() if len(lines) > 1 else []
    if attribute not in names:
        raise DatasetError(f"CelebA: no attribute {attribute!r} in {attributes_file}")
    column = names.index(attribute)
    partition = {}
    for line in text_lines(partition_file, "CelebA"):
        parts = line.split()
        if len(parts) == 2:
            partition[parts[0]] = parts[1]
    split_names = {"0": "train", "1": "val", "2": "test"}
    splits = {s: [] for s in split_names.values()}
    skipped = {s: Counter() for s in split_names.values()}
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        split = split_names.get(partition.get(parts[0]), None)
        if split is None:
            skipped["train"]["not in list_eval_partition.txt"] += 1
            continue
        if len(parts) != len(names) + 1 or parts[column + 1] not in ("1", "-1"):
            skipped[split]["malformed attribute row"] += 1
            continue
        path = os.path.join(images, parts[0])
        if not os.path.exists(path):
            skipped[split]["image file missing"] += 1
            continue
        splits[split].append(Sample(path, 1 if parts[column + 1] == "1" else 0, CELEBA_BOX))
    points, damaged = celeba_mean_five_points(root)
    if damaged:  # the layout's mean is over the readable rows; the images are all still used
        skipped["train"]["list_landmarks_align_celeba.txt row unreadable (not in the masks' layout)"] += damaged
    width, height = CELEBA_BOX[2] - CELEBA_BOX[0], CELEBA_BOX[3] - CELEBA_BOX[1]
    five_points = tuple(((x - CELEBA_BOX[0]) / width, (y - CELEBA_BOX[1]) / height) for x, y in points)
    return FaceData("celeba", "classify", CELEBA_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=five_points)


def celeba_mean_five_points(root):
    """The mean of CelebA's own five points per aligned image (list_landmarks_align_celeba.txt:
    a count, the names lefteye_x ... rightmouth_y, then one row per image; image-left eye
    first); the approximate means when the file is not there. Returns (points, the number of
    image rows that could not be read, which the mean leaves out)."""
    path = find(root, "list_landmarks_align_celeba.txt", "CelebA", required=False)
    rows, damaged = [], 0
    for line in list(text_lines(path, "CelebA"))[2:] if path else ():  # after count and names
        parts = line.split()
        try:
            if len(parts) != 11:
                raise ValueError
            rows.append([float(v) for v in parts[1:]])
        except ValueError:
            damaged += bool(parts)
    if not rows:
        return CELEBA_MEAN_FIVE_POINTS, damaged
    mean = np.mean(rows, 0)
    return [(mean[2 * k], mean[2 * k + 1]) for k in range(5)], damaged


UTKFACE_CLASSES = ["male", "female"]


def hash_bucket(name, buckets=10):
    """A file's bucket from a hash of its name: a split that is stable across machines and
    runs, and does not change when other files come or go."""
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % buckets


def read_utkface(root):
    """No official split: 80 / 10 / 10 % by a hash of the file name (stable across machines
    and runs, and independent of which files are present)."""
    folder = os.path.dirname(find(root, "*_*_*.jpg*", "UTKFace"))
    splits = {"train": [], "val": [], "test": []}
    skipped = {s: Counter() for s in splits}
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith((".jpg", ".jpg.chip.jpg", ".png")):
            continue
        bucket = hash_bucket(name)
        split = "train" if bucket < 8 else ("val" if bucket == 8 else "test")
        fields = name.split("_")
        if len(fields) < 3 or fields[1] not in ("0", "1") or not fields[0].isdigit():
            skipped[split]["file name is not age_gender_race_datetime"] += 1
            continue
        splits[split].append(Sample(os.path.join(folder, name), int(fields[1])))
    return FaceData("utkface", "classify", UTKFACE_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=UTKFACE_FIVE_POINTS)


# ----------------------------------------------------------------------------------------------
# FER2013 (fer2013.csv: emotion, 2304 space-separated grey pixels, Usage), RAF-DB basic, and a
# plain folder of class sub-folders.

FER2013_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def fer2013_rows(path):
    """Every data row of fer2013.csv in file order (FER+ matches its rows by position, so a
    damaged row must keep its place): (Usage, emotion, 48x48 pixels), or (Usage, None, the
    reason the row is unusable)."""
    rows = csv.DictReader(text_lines(path, "FER2013"))
    if not {"emotion", "pixels", "Usage"} <= set(rows.fieldnames or ()):
        raise DatasetError(f"FER2013: {path} does not start with the header emotion,pixels,Usage")
    for row in rows:
        usage = (row.get("Usage") or "").strip()
        try:
            label = int(row["emotion"])
            pixels = np.array(row["pixels"].split(), dtype=np.int64)
        except (ValueError, TypeError, AttributeError):
            yield usage, None, "malformed row"
            continue
        if pixels.size != 48 * 48 or pixels.min() < 0 or pixels.max() > 255:
            yield usage, None, f"malformed row ({pixels.size} pixels of 0..255, expected 2304)"
            continue
        yield usage, label, pixels.astype(np.uint8).reshape(48, 48)


FER2013_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def read_fer2013(root):
    """The challenge's fer2013.csv where there is one, else the image-folder re-release."""
    path = find(root, "fer2013.csv", "FER2013", required=False)
    return read_fer2013_csv(path) if path else read_fer2013_folders(root)


def read_fer2013_csv(path):
    splits = {s: [] for s in FER2013_SPLITS.values()}
    skipped = {s: Counter() for s in FER2013_SPLITS.values()}
    for usage, label, pixels in fer2013_rows(path):
        split = FER2013_SPLITS.get(usage)
        if split is None:
            skipped["train"]["unknown Usage"] += 1
        elif label is None:
            skipped[split][pixels] += 1
        elif not 0 <= label < 7:
            skipped[split][f"emotion {label} outside 0..6"] += 1
        else:
            splits[split].append(Sample(pixels, label))
    return FaceData("fer2013", "classify", FER2013_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=FER2013_FIVE_POINTS)


# The image-folder re-release that most people download: train/<class>/Training_<id>.jpg and
# test/<class>/{PublicTest,PrivateTest}_<id>.jpg, the class folders named in lower case. The
# file-name prefix is the challenge's Usage column, so it decides the split, and the classes
# are mapped to the CSV's order: a checkpoint means the same whichever form it was trained on.
# Other re-uploads drop the prefixes; their test folder is then the test split, and load()
# holds a validation split out of train (FaceData.note says these are not the challenge's).
FER2013_FOLDER_SPLITS = ("train", "val", "test")


def read_fer2013_folders(root):
    what = "FER2013 (fer2013.csv, or the folder release train/<class>/ and test/<class>/)"
    base = os.path.dirname(os.path.dirname(find(root, os.path.join("train", "[Hh][Aa][Pp][Pp][Yy]"), what)))
    index_of = {name.lower(): k for k, name in enumerate(FER2013_CLASSES)}
    splits = {s: [] for s in FER2013_SPLITS.values()}
    skipped = {s: Counter() for s in FER2013_SPLITS.values()}
    for folder_split in FER2013_FOLDER_SPLITS:
        directory = os.path.join(base, folder_split)
        if not os.path.isdir(directory):
            continue
        for class_name in sorted(os.listdir(directory)):
            folder = os.path.join(directory, class_name)
            if not os.path.isdir(folder) or class_name == CACHE_FOLDER:
                continue
            for name in sorted(os.listdir(folder)):
                split = FER2013_SPLITS.get(name.split("_", 1)[0], folder_split)
                label = index_of.get(class_name.strip().lower())
                problem = (f"unknown class folder {class_name!r}" if label is None else
                           fer2013_image_problem(os.path.join(folder, name)))
                if problem:
                    skipped[split][problem] += 1
                else:
                    splits[split].append(Sample(os.path.join(folder, name), label))
    splits = {s: samples for s, samples in splits.items() if samples or skipped[s]}
    skipped = {s: skipped[s] for s in splits}
    data = FaceData("fer2013", "classify", FER2013_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=FER2013_FIVE_POINTS)
    if "val" not in splits:
        data.note = ("this FER2013 copy names no PublicTest/PrivateTest files: its test folder is "
                     "the test split and a tenth of train (by file name) selects, so the figures "
                     "are not the challenge's PrivateTest protocol")
    return data


def fer2013_image_problem(path):
    """Why a file of the folder release is not a FER2013 face (None if it is one): FER2013's
    faces are 48x48 grey. Reads the header only."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file"
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
    except (OSError, ValueError, SyntaxError):
        return "unreadable image"
    if size != (48, 48) or mode != "L":
        return "not a 48x48 grey image"
    return None


# FER+ (Microsoft's relabelling of FER2013): fer2013new.csv beside fer2013.csv, one row per
# FER2013 row in the same order (matched by position, there is no key): Usage, Image name, then
# ten annotators' votes for neutral, happiness, surprise, sadness, anger, disgust, fear,
# contempt, unknown, NF (not a face). An empty image name marks a row that is not a face.

FERPLUS_CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt"]


def ferplus_majority(votes):
    """The "majority" protocol of FER+'s own reference reader: a vote of exactly 1 is an outlier
    and is zeroed; the row is kept only if its top count is more than half of what remains (so a
    tie never is), and only if that top is an emotion, not unknown or NF. The class, or the
    reason for dropping the row."""
    votes = [0 if v == 1 else v for v in votes]
    top = max(range(len(votes)), key=votes.__getitem__)
    if votes[top] * 2 <= sum(votes):
        return "no majority (after zeroing single votes)"
    if top >= len(FERPLUS_CLASSES):
        return "majority unknown" if top == len(FERPLUS_CLASSES) else "majority not a face (NF)"
    return top


def read_ferplus(root):
    labels = find(root, "fer2013new.csv", "FER+")
    pixels_file = find(root, "fer2013.csv", "FER+ (the pixels: fer2013.csv beside fer2013new.csv)")
    faces = list(fer2013_rows(pixels_file))
    header, *votes = csv.reader(text_lines(labels, "FER+"))
    if [h.strip() for h in header[:2]] != ["Usage", "Image name"] or len(header) != 12:
        raise DatasetError(f"FER+: {labels} does not start with the header Usage,Image name,"
                           f"neutral,...,unknown,NF")
    if len(votes) != len(faces):
        raise DatasetError(f"FER+: {labels} has {len(votes)} rows and {pixels_file} {len(faces)}; "
                           f"they are matched by position, so they must come from one release")
    splits = {s: [] for s in FER2013_SPLITS.values()}
    skipped = {s: Counter() for s in FER2013_SPLITS.values()}
    for (_, fer_label, image), row in zip(faces, votes):
        split = FER2013_SPLITS.get(row[0].strip() if row else "")
        if split is None:
            skipped["train"]["unknown Usage"] += 1
            continue
        if len(row) != 12 or not row[1].strip():
            skipped[split]["no image name (not a face)" if len(row) == 12 else "malformed row"] += 1
            continue
        try:
            label = ferplus_majority([int(v) for v in row[2:]])
        except ValueError:
            skipped[split]["malformed row (votes not integers)"] += 1
            continue
        if isinstance(label, str):
            skipped[split][label] += 1
            continue
        if fer_label is None:
            skipped[split][f"fer2013.csv row damaged: {image}"] += 1
            continue
        splits[split].append(Sample(image, label))
    return FaceData("ferplus", "classify", FERPLUS_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=FER2013_FIVE_POINTS)  # FER2013's own faces


RAFDB_CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]


def read_rafdb(root):
    labels = find(root, "list_patition_label.txt", "RAF-DB basic")
    basic = os.path.dirname(os.path.dirname(labels))
    aligned = os.path.join(basic, "Image", "aligned")
    original = os.path.join(basic, "Image", "original")
    splits = {"train": [], "test": []}
    skipped = {s: Counter() for s in splits}
    for line in text_lines(labels, "RAF-DB basic"):
        parts = line.split()
        if not parts:
            continue
        split = "train" if parts[0].startswith("train") else "test"
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
            skipped[split]["malformed row or label outside 1..7"] += 1
            continue
        stem = os.path.splitext(parts[0])[0]
        path = os.path.join(aligned, f"{stem}_aligned.jpg")
        if not os.path.exists(path):
            path = os.path.join(original, parts[0])
        if not os.path.exists(path):
            skipped[split]["image file missing"] += 1
            continue
        splits[split].append(Sample(path, int(parts[1]) - 1))
    return FaceData("rafdb", "classify", RAFDB_CLASSES, splits, skipped, "test", margin=0.0,
                    five_points=ALIGNED_FIVE_POINTS)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_folder(root):
    """root/<class>/*.jpg, or root/{train,val,test}/<class>/*.jpg. Classes sorted by name.
    Without split folders, a stratified 10 % is held out as "val" by a hash of the file name."""
    require_dir(root, "image folder")
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    layout = {s: os.path.join(root, s) for s in split_dirs} or {"all": root}
    classes = sorted({c for d in layout.values() for c in os.listdir(d)
                      if os.path.isdir(os.path.join(d, c)) and c != CACHE_FOLDER})
    if not classes:
        raise DatasetError(f"image folder: expected class sub-folders in {root}, found none")
    splits, skipped = {}, {}
    for split, directory in layout.items():
        samples = []
        for index, name in enumerate(classes):
            folder = os.path.join(directory, name)
            if os.path.isdir(folder):
                samples += [Sample(os.path.join(folder, f), index) for f in sorted(os.listdir(folder))
                            if f.lower().endswith(IMAGE_EXTENSIONS)]
        splits[split], skipped[split] = samples, Counter()
    if "all" in splits:
        # by the path inside the dataset, never the absolute one: a moved or copied folder,
        # or a second machine, must hold out the same files
        held = {s.image for s in splits["all"]
                if hash_bucket(os.path.relpath(s.image, root).replace(os.sep, "/")) == 0}
        splits = {"train": [s for s in splits["all"] if s.image not in held],
                  "val": [s for s in splits["all"] if s.image in held]}
        skipped = {"train": Counter(), "val": Counter()}
    eval_split = "test" if "test" in splits else "val"
    return FaceData("folder", "classify", classes, splits, skipped, eval_split, margin=0.0)


# ----------------------------------------------------------------------------------------------
# Aff-Wild2 (Kollias & Zafeiriou), in the ABAW challenges' release: face crops per video,
# cropped_aligned/<video>/<frame:05d>.jpg (a frame where no face was found has no file), and
# per challenge one annotation file per video, in Train_Set/ and Validation_Set/ folders:
# EXPR_*/<split>/<video>.txt holds a header naming the classes, then one label per frame
# (-1 = unlabeled); VA_*/<split>/<video>.txt holds the header "valence,arousal", then one pair
# per frame (-5 = invalid). Line i below the header is frame i (00001.jpg first). The test
# labels were never released: Validation_Set is what papers report on.

AFFWILD2_SPLITS = {"Train_Set": "train", "Validation_Set": "val"}


def read_frame_annotations(path):
    """(header, [numbers of frame 1, 2, ...]); a line that is not comma-separated numbers is None."""
    with open(path, errors="replace") as f:
        header = f.readline().strip()
        rows = []
        for line in f:
            try:
                rows.append([float(v) for v in line.strip().split(",")])
            except ValueError:
                rows.append(None)
    return header, rows


def affwild2_files(challenge_dir):
    """{split: {video: annotation path}} of one challenge's folder."""
    return {split: {os.path.splitext(os.path.basename(p))[0]: p
                    for p in sorted(glob.glob(os.path.join(challenge_dir, folder, "*.txt")))}
            for folder, split in AFFWILD2_SPLITS.items()}


def read_affwild2(root, labels="expr"):
    """labels="expr": the frames with an expression label (the EXPR challenge), classes as
    the header names them; valence/arousal ride along where the VA challenge labels the same
    frame. labels="va": the frames with a valid valence/arousal pair (task "va")."""
    frames = find(root, "cropped_aligned", "Aff-Wild2 (face crops)", depth=3)
    expr_dir = find(root, "EXPR_*", "Aff-Wild2 (expression annotations)", depth=3,
                    required=labels == "expr")
    va_dir = find(root, "VA_*", "Aff-Wild2 (valence/arousal annotations)", depth=3,
                  required=labels == "va")
    expr_files = affwild2_files(expr_dir) if expr_dir else {}
    va_files = affwild2_files(va_dir) if va_dir else {}
    expr_any = {video: path for split in expr_files.values() for video, path in split.items()}
    va_any = {video: path for split in va_files.values() for video, path in split.items()}
    primary = expr_files if labels == "expr" else va_files
    classes = None
    if labels == "expr" and expr_any:
        classes = read_frame_annotations(next(iter(expr_any.values())))[0].split(",")
    splits, skipped = {}, {}
    for split, videos in primary.items():
        samples, reasons = [], Counter()
        for video, path in videos.items():
            expressions = (read_affwild2_expressions(expr_any.get(video), classes, reasons)
                           if labels == "expr" else [])
            affect = read_affwild2_affect(va_any.get(video), reasons)
            count = len(expressions if labels == "expr" else affect)
            folder = os.path.join(frames, video)
            if not os.path.isdir(folder):
                reasons["video folder missing from cropped_aligned"] += count
                continue
            present = set(os.listdir(folder))
            for frame in range(1, count + 1):
                expression = expressions[frame - 1] if frame <= len(expressions) else "unannotated"
                va = affect[frame - 1] if frame <= len(affect) else "unannotated"
                wanted = expression if labels == "expr" else va
                if isinstance(wanted, str):
                    reasons[wanted] += 1
                    continue
                name = f"{frame:05d}.jpg"
                if name not in present:
                    reasons["frame image missing (no face found)"] += 1
                    continue
                samples.append(Sample(os.path.join(folder, name),
                                      expression if labels == "expr" else -1,
                                      va=None if isinstance(va, str) else va, subject=video))
        splits[split], skipped[split] = samples, reasons
    if labels == "va":
        return FaceData("affwild2_va", "va", None, splits, skipped, "val", margin=0.0,
                        five_points=ALIGNED_FIVE_POINTS, labels=("va",))
    return FaceData("affwild2", "classify", classes, splits, skipped, "val", margin=0.0,
                    five_points=ALIGNED_FIVE_POINTS, labels=("target", "va"))


def read_affwild2_expressions(path, classes, reasons):
    """Per frame: the class index, or the reason it has none. [] without a file; a file whose
    header names other classes is skipped whole and counted."""
    if path is None:
        return []
    header, rows = read_frame_annotations(path)
    if header.split(",") != classes:
        reasons[f"expression file header is not {','.join(classes)}"] += len(rows)
        return []
    labels = []
    for row in rows:
        if row is None or len(row) != 1 or not row[0].is_integer():
            labels.append("malformed expression line")
        elif row[0] == -1:
            labels.append("expression unlabeled (-1)")
        elif not 0 <= row[0] < len(classes):
            labels.append(f"expression outside 0..{len(classes) - 1}")
        else:
            labels.append(int(row[0]))
    return labels


def read_affwild2_affect(path, reasons):
    """Per frame: (valence, arousal), or the reason it has none. [] without a file."""
    if path is None:
        return []
    header, rows = read_frame_annotations(path)
    if header.replace(" ", "").lower() != "valence,arousal":
        reasons["valence/arousal file header is not valence,arousal"] += len(rows)
        return []
    pairs = []
    for row in rows:
        if row is None or len(row) != 2:
            pairs.append("malformed valence/arousal line")
        elif -5 in row:
            pairs.append("valence/arousal invalid (-5)")
        elif max(abs(v) for v in row) > 1:
            pairs.append("valence/arousal outside [-1, 1]")
        else:
            pairs.append(tuple(row))
    return pairs


# Aff-Wild2 in ABAW-4's multi-task challenge release (s-Aff-Wild2): one annotation file per
# split, a header, then "video/frame.jpg,valence,arousal,expression,AU1,...,AU26" per frame,
# with the frames in cropped_aligned/. Missing: VA -5 (both are masked when either is),
# expression -1, AUs -1. Each frame may carry any subset of the three tasks.

AFFWILD2_MTL_FILES = {"train": "training_set_annotations.txt", "val": "validation_set_annotations.txt"}
AFFWILD2_MTL_CLASSES = ["Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise",
                        "Other"]


def read_affwild2_mtl(root):
    frames = find(root, "cropped_aligned", "Aff-Wild2 (face crops)", depth=3)
    splits, skipped = {}, {}
    for split, filename in AFFWILD2_MTL_FILES.items():
        path = find(root, filename, "Aff-Wild2 MTL annotations", depth=3)
        rows = csv.reader(text_lines(path, "Aff-Wild2 MTL"))
        header = [h.strip() for h in next(rows, [])]
        if header[:4] != ["image", "valence", "arousal", "expression"] or \
                tuple(header[4:]) != AU_NAMES:
            raise DatasetError(f"Aff-Wild2 MTL: {path} does not start with the header "
                               f"image,valence,arousal,expression,{','.join(AU_NAMES)}")
        samples, reasons, seen, listings = [], Counter(), set(), {}
        for row in rows:
            if not row or not row[0].strip():
                continue
            name = row[0].strip()
            try:
                values = [float(v) for v in row[1:]]
            except ValueError:
                reasons["malformed row (non-numeric field)"] += 1
                continue
            if len(values) != 3 + AU_COUNT:
                reasons[f"malformed row ({len(row)} fields, expected {4 + AU_COUNT})"] += 1
                continue
            valence, arousal, expression, units = values[0], values[1], values[2], values[3:]
            va = None if -5 in (valence, arousal) else (valence, arousal)
            if (va and max(abs(valence), abs(arousal)) > 1) or expression not in range(-1, 8) or \
                    any(u not in (-1, 0, 1) for u in units):
                reasons["label outside its range (VA [-1, 1] or -5; expression -1..7; AU -1, 0, 1)"] += 1
                continue
            if name in seen:
                reasons["duplicate image name (the first row kept)"] += 1
                continue
            seen.add(name)
            if va is None and expression == -1 and all(u == -1 for u in units):
                reasons["no label for any task"] += 1
                continue
            video, _, frame = name.rpartition("/")
            if video not in listings:
                folder = os.path.join(frames, video)
                listings[video] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if frame not in listings[video]:
                reasons["image file missing"] += 1
                continue
            samples.append(Sample(os.path.join(frames, video, frame), int(expression),
                                  va=va or (-5.0, -5.0), subject=video,
                                  au=tuple(int(u) for u in units)))
        splits[split], skipped[split] = samples, reasons
    return FaceData("affwild2_mtl", "classify", AFFWILD2_MTL_CLASSES, splits, skipped, "val",
                    margin=0.0, five_points=ALIGNED_FIVE_POINTS, labels=("target", "va", "au"))


# ABAW-4's learning-from-synthetic-data challenge: train on synthetic faces, validate on real
# ones, each split a folder per class. The challenge's class order, its folder names (sic).
ABAW_LSD_FOLDERS = ("ANGRER", "DISGUST", "FEAR", "HAPPINESS", "SADNESS", "SURPRISE")
ABAW_LSD_CLASSES = ["Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise"]
ABAW_LSD_SPLITS = {"train": "training_set_synthetic_images", "val": "validation_set_real_images"}


def read_abaw_lsd(root):
    """Scored by macro-F1 over the 6 classes (tasks.expression_score). The synthetic training
    set is about half sadness: the class weights (--imbalance weights, the default) or
    oversampling apply as on any dataset."""
    folders = {folder.lower(): k for k, folder in enumerate(ABAW_LSD_FOLDERS)}
    folders["anger"] = 0  # in case a copy fixed the spelling
    splits, skipped = {}, {}
    for split, name in ABAW_LSD_SPLITS.items():
        base = find(root, name, "ABAW LSD", depth=3)
        reasons = Counter()
        samples = [Sample(path, label) for label, path in
                   class_folder_images(base, folders, reasons, "the challenge's 6 classes")]
        splits[split], skipped[split] = samples, reasons
    return FaceData("abaw_lsd", "classify", ABAW_LSD_CLASSES, splits, skipped, "val", margin=0.0,
                    five_points=ALIGNED_FIVE_POINTS)


def task_label_counts(samples):
    """Per task, how many samples carry its label (the MTL datasets' frames carry any subset)."""
    return {"va": sum(1 for s in samples if s.va is not None and max(map(abs, s.va)) <= 1),
            "expression": sum(1 for s in samples if isinstance(s.target, int) and s.target >= 0),
            "au": sum(1 for s in samples if s.au is not None and min(s.au) >= 0)}


# ----------------------------------------------------------------------------------------------
# The built-in demo: synthetic faces whose 8 expressions (AffectNet's classes) are carried by
# fine details (mouth curve and opening, brow height and slant, eye opening, a nose wrinkle, a
# one-sided smile), under nuisance variation in identity, skin tone, pose, scale, lighting,
# noise and occlusion. Written once in AffectNet's original layout, so the demo runs the real
# AffectNet reader, protocol and landmarks included, plus a test.csv in the same format: a
# held-out split that no model selection sees (validation.csv picks best.pt).

DEMO_VERSION = 3  # 3: action units (action_units.csv)
USER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hmtl")
DEMO_DEFAULT_ROOT = os.path.join(USER_CACHE, f"demo-v{DEMO_VERSION}")

# per expression: brow raise, brow slant (inner end up > 0), eye opening, mouth curve (corners
# up > 0), mouth opening, mouth width, one-sided corner raise, nose wrinkle; then valence,
# arousal
DEMO_EXPRESSIONS = [
    # raise slant  eye  curve  open width  side  nose    V     A
    (0.00, 0.00, 1.00, 0.00, 0.00, 1.00, 0.00, 0.0, 0.0, 0.0),     # Neutral
    (0.00, 0.00, 0.75, 0.14, 0.12, 1.15, 0.00, 0.0, 0.7, 0.4),     # Happy
    (0.02, 0.10, 0.85, -0.12, 0.00, 0.90, 0.00, 0.0, -0.6, -0.3),  # Sad
    (0.13, 0.00, 1.50, 0.00, 0.40, 0.70, 0.00, 0.0, 0.2, 0.8),     # Surprise
    (0.10, 0.10, 1.45, -0.04, 0.18, 1.20, 0.00, 0.0, -0.5, 0.7),   # Fear
    (-0.04, -0.03, 0.70, -0.07, 0.06, 0.95, 0.00, 1.0, -0.6, 0.3),  # Disgust
    (-0.07, -0.13, 0.70, -0.02, 0.00, 0.85, 0.00, 0.0, -0.6, 0.6),  # Anger
    (0.00, 0.00, 0.95, 0.00, 0.00, 1.00, 0.14, 0.0, -0.4, 0.2),     # Contempt
]
DEMO_CANVAS = 128


def demo_face(rng, expression):
    """Draw one synthetic face. Returns (PIL image, face box (x, y, w, h), (68, 2) landmarks,
    valence, arousal, action units)."""
    face = demo_face_shape(rng, expression)
    image = photograph_demo_face(rng, draw_demo_face(rng, face))
    x0, y0 = face.outline.min(0)
    x1, y1 = face.outline.max(0)
    valence, arousal = np.clip(np.array(DEMO_EXPRESSIONS[expression][8:]) * rng.uniform(0.6, 1.2)
                               + rng.normal(0, 0.08, 2), -1, 1)
    action_units = demo_action_units(*face.movement)
    return image, (x0, y0, x1 - x0, y1 - y0), face.landmarks, float(valence), float(arousal), action_units


def demo_face_shape(rng, expression):
    """Where one face's parts are: its expression's movement (DEMO_EXPRESSIONS, varied in
    strength and jittered), a placement on the canvas (size, position, roll, a hint of yaw),
    and the 68 landmarks in iBUG order that the drawing follows."""
    neutral = np.array(DEMO_EXPRESSIONS[0][:8])
    delta = (np.array(DEMO_EXPRESSIONS[expression][:8]) - neutral) * rng.uniform(0.6, 1.2)
    delta += rng.normal(0, 1, 8) * np.array([0.015, 0.015, 0.08, 0.02, 0.02, 0.05, 0.015, 0.1])
    brow_raise, slant, eye_open, curve, mouth_open, width, side, wrinkle = neutral + delta
    side *= rng.choice([-1, 1])

    face_w = rng.uniform(52, 76)
    face_h = face_w * rng.uniform(1.15, 1.3)
    centre = np.array([DEMO_CANVAS / 2, DEMO_CANVAS / 2]) + rng.uniform(-12, 12, 2)
    angle = math.radians(rng.uniform(-15, 15))
    yaw = rng.uniform(-0.12, 0.12)  # a hint of turn: features shift sideways
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def to_image(u, v):
        """Face coordinates (u right, v down, [-1, 1] across the face) -> image pixels."""
        local = np.stack([(np.asarray(u) + yaw * (1 - np.asarray(u) ** 2)) * face_w / 2,
                          np.asarray(v) * face_h / 2], -1)
        return local @ rotation.T + centre

    t = np.radians(np.linspace(170, 370, 17))  # ear to ear through the chin (v points down)
    jaw = to_image(np.cos(t) * 0.98, -np.sin(t) * 0.98)
    brows = []
    # the subject's right brow first (image left), each from image-left to image-right
    for u in (-np.linspace(0.62, 0.16, 5), np.linspace(0.16, 0.62, 5)):
        inner = 1 - (np.abs(u) - 0.16) / 0.46   # 1 at the inner end
        v = -0.36 - brow_raise - slant * inner + 0.03 * np.sin(np.pi * (1 - inner))
        brows.append(to_image(u, v))
    nose = np.concatenate([to_image(np.zeros(4), np.linspace(-0.2, 0.12, 4)),
                           to_image(np.linspace(-0.13, 0.13, 5), 0.2 + 0.03 * np.abs(np.linspace(-1, 1, 5)))])
    eyes = []
    for centre_u in (-0.36, 0.36):
        ring = np.radians([180, 120, 60, 0, -60, -120])
        openness = 0.07 * eye_open
        eyes.append(to_image(centre_u + 0.14 * np.cos(ring), -0.12 - openness * np.sin(ring)))
    outer, inner_top, inner_bottom = demo_mouth(to_image, curve, side, mouth_open, width)
    t = np.linspace(0, 2 * np.pi, 48)
    return types.SimpleNamespace(
        to_image=to_image, face_w=face_w, outline=to_image(np.cos(t), np.sin(t)),
        brows=brows, nose=nose, eyes=eyes, outer=outer, inner_top=inner_top, inner_bottom=inner_bottom,
        landmarks=np.concatenate([jaw, *brows, nose, *eyes, outer, inner_top, inner_bottom]),
        wrinkle=wrinkle, mouth_open=mouth_open,
        movement=(brow_raise, slant, eye_open, curve, mouth_open, width, wrinkle))


def demo_mouth(to_image, curve, side, mouth_open, width):
    """The mouth's 12 outer and 8 inner landmarks: its corners lifted by `curve` (a smile) and
    `side` (one corner, contempt), its lower lip dropped by `mouth_open`."""
    half = 0.28 * width
    mouth_u = np.linspace(-half, half, 7)
    rise = curve * (mouth_u / half) ** 2 + side * (mouth_u / half + 1) / 2
    upper = 0.5 - rise - 0.02 * np.cos(np.pi * mouth_u / half / 2)
    lower_u = np.linspace(half, -half, 7)[1:-1]
    lower_rise = curve * (lower_u / half) ** 2 + side * (lower_u / half + 1) / 2
    lower = 0.5 - lower_rise + 0.05 + mouth_open * np.cos(np.pi * lower_u / half / 2)
    outer = np.concatenate([to_image(mouth_u, upper), to_image(lower_u, lower)])
    inner_u = np.linspace(-half * 0.7, half * 0.7, 5)
    inner_rise = curve * (inner_u / half) ** 2 + side * (inner_u / half + 1) / 2
    inner_top = to_image(inner_u, 0.5 - inner_rise + 0.01)
    inner_bottom = to_image(inner_u[::-1][1:-1], 0.5 - inner_rise[::-1][1:-1] + 0.02 +
                            mouth_open * 0.8 * np.cos(np.pi * inner_u[::-1][1:-1] / half / 2))
    return outer, inner_top, inner_bottom


def draw_demo_face(rng, face):
    """The face of `demo_face_shape` drawn on a cluttered background: skin, hair, brows, eyes
    with pupils, nose, lips (open or closed), the wrinkled nose of disgust."""
    skin = np.array(rng.choice([[236, 200, 170], [210, 160, 120], [160, 110, 80], [110, 75, 55],
                                [250, 220, 200]])) * rng.uniform(0.85, 1.1)
    background = rng.uniform(20, 235, 3)
    image = Image.new("RGB", (DEMO_CANVAS, DEMO_CANVAS), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):  # background clutter
        x, y = rng.uniform(0, DEMO_CANVAS, 2)
        r = rng.uniform(5, 30)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
    t = np.linspace(0, 2 * np.pi, 48)
    hair = tuple(int(c) for c in rng.uniform(10, 120, 3))
    draw.polygon([tuple(p) for p in face.to_image(np.cos(t) * 1.08, np.sin(t) * 1.06 - 0.08)], fill=hair)
    draw.polygon([tuple(p) for p in face.outline], fill=tuple(int(c) for c in skin))
    feature = tuple(int(c) for c in skin * rng.uniform(0.25, 0.45))
    stroke = max(1, int(round(face.face_w / 28)))
    for brow in face.brows:
        draw.line([tuple(p) for p in brow], fill=hair, width=stroke + 1)
    for eye in face.eyes:
        draw.polygon([tuple(p) for p in eye], fill=(245, 245, 240), outline=feature)
        pupil = eye.mean(0)
        r = min(face.face_w * 0.035, max(1.0, np.ptp(eye[:, 1]) / 2))
        draw.ellipse([pupil[0] - r, pupil[1] - r, pupil[0] + r, pupil[1] + r], fill=(30, 25, 20))
    draw.line([tuple(p) for p in face.nose[:4]], fill=feature, width=1)
    draw.line([tuple(p) for p in face.nose[4:]], fill=feature, width=stroke)
    if face.wrinkle > 0.5:
        for k in (-1, 1):
            a, b = face.to_image(k * 0.05, -0.02), face.to_image(k * 0.16, 0.06)
            draw.line([tuple(a), tuple(b)], fill=feature, width=stroke)
    lips = tuple(int(c) for c in np.clip(skin * np.array([0.75, 0.45, 0.45]), 0, 255))
    draw.polygon([tuple(p) for p in face.outer], fill=lips)
    if face.mouth_open > 0.08:
        draw.polygon([tuple(p) for p in np.concatenate([face.inner_top, face.inner_bottom])], fill=(40, 10, 10))
    else:
        draw.line([tuple(p) for p in face.inner_top], fill=feature, width=stroke)
    return image


def photograph_demo_face(rng, image):
    """What a camera adds to a drawn face: a lighting gradient, exposure, sensor noise, and
    sometimes an occluder (a hand, a scarf, sunglasses' edge...)."""
    pixels = np.asarray(image, dtype=np.float32)
    light = rng.uniform(-0.35, 0.35, 2)
    yy, xx = np.mgrid[0:DEMO_CANVAS, 0:DEMO_CANVAS] / DEMO_CANVAS - 0.5
    pixels *= (1 + light[0] * xx + light[1] * yy)[..., None] * rng.uniform(0.7, 1.2)
    pixels += rng.normal(0, rng.uniform(2, 10), pixels.shape)
    if rng.random() < 0.25:
        x, y = rng.uniform(0, DEMO_CANVAS, 2)
        w, h = rng.uniform(8, 28, 2)
        pixels[int(y):int(y + h), int(x):int(x + w)] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def demo_action_units(brow_raise, slant, eye_open, curve, mouth_open, width, wrinkle):
    """ABAW's 12 action units (AU_NAMES order), read off the geometry that drew the face,
    as a FACS coder reads them off the movement: AU1 inner brow raised, AU2 brows raised, AU4
    brows lowered or drawn in, AU6/AU12 a smile, AU7 narrowed eyes, AU10 the wrinkled nose of
    disgust, AU15 corners down, AU23/AU24 lips narrowed and pressed, AU25 lips apart, AU26 a
    dropped jaw. Each beyond a threshold of the drawn value (the neutral face has none)."""
    return (int(slant > 0.05), int(brow_raise > 0.07), int(brow_raise < -0.03 or slant < -0.06),
            int(curve > 0.08), int(eye_open < 0.8), int(wrinkle > 0.5), int(curve > 0.06),
            int(curve < -0.06), int(width < 0.9), int(width < 0.9 and mouth_open < 0.05),
            int(mouth_open > 0.08), int(mouth_open > 0.25))


def make_demo(root=DEMO_DEFAULT_ROOT, train_per_class=300, val_per_class=50, test_per_class=100,
              seed=0):
    """Write the demo set once (AffectNet original layout, plus test.csv) and return its root.
    A finished set is marked by a stamp file; an interrupted write is redone from the start."""
    stamp = os.path.join(root, "demo-complete.json")
    settings = dict(version=DEMO_VERSION, train_per_class=train_per_class,
                    val_per_class=val_per_class, test_per_class=test_per_class, seed=seed)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return root
    rng = np.random.default_rng(seed)
    lists = os.path.join(root, "Manually_Annotated_file_lists")
    os.makedirs(lists, exist_ok=True)
    index = 0
    action_units = [["subDirectory_filePath", *AU_NAMES]]
    for split, per_class, filename in (("train", train_per_class, "training.csv"),
                                       ("val", val_per_class, "validation.csv"),
                                       ("test", test_per_class, "test.csv")):
        labels = [c for c in range(8) for _ in range(per_class)]
        if split == "train":
            labels += [8] * (per_class // 25)  # a few "None" rows: the 8-class protocol drops them
        rows = [["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                 "facial_landmarks", "expression", "valence", "arousal"]]
        for label in rng.permutation(labels):
            image, box, landmarks, valence, arousal, units = demo_face(
                rng, int(label) if label < 8 else int(rng.integers(0, 8)))
            relative = f"{index // 500:03d}/{index:06d}.jpg"
            path = os.path.join(root, "Manually_Annotated_Images", relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path, quality=92)
            rows.append([relative, *(f"{v:.1f}" for v in box),
                         ";".join(f"{v:.2f}" for v in landmarks.ravel()), int(label),
                         f"{valence:.4f}", f"{arousal:.4f}"])
            # a fifth of the faces has no AU labels, as ABAW's frames often lack one task's; a
            # generator of its own, so the faces are those of a demo without AUs
            unlabelled = np.random.default_rng([seed, index]).random() < 0.2
            action_units.append([relative, *([-1] * AU_COUNT if unlabelled else units)])
            index += 1
        with open(os.path.join(lists, filename), "w", newline="") as f:
            csv.writer(f).writerows(rows)
    with open(os.path.join(lists, "action_units.csv"), "w", newline="") as f:
        csv.writer(f).writerows(action_units)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return root


def read_demo(root=None):
    """The demo set under `root` as it was written, or a default one written there first."""
    root = root or DEMO_DEFAULT_ROOT
    if not os.path.exists(os.path.join(root, "demo-complete.json")):
        make_demo(root)
    data = read_affectnet(root, 8)
    data.name, data.labels = "demo", ("target", "va", "au")
    with open(os.path.join(root, "Manually_Annotated_file_lists", "action_units.csv"), newline="") as f:
        units = {row[0]: tuple(int(v) for v in row[1:]) for row in list(csv.reader(f))[1:]}
    image_root = os.path.join(root, "Manually_Annotated_Images")
    for samples in data.splits.values():
        for sample in samples:
            sample.au = units[os.path.relpath(sample.image, image_root).replace(os.sep, "/")]
    return data


# ----------------------------------------------------------------------------------------------
# Where the facial parts sit in crops without landmarks, as five points (right eye centre, left
# eye centre (the subject's), nose tip, right and left mouth corner; (x, y) as fractions of the
# crop). ssl_tasks.five_point_layout turns them into the in-painting regions.

# dlib's mean face shape (the 51 inner points of get_face_chip_details, dlib/image_transforms/
# interpolation.h): its five points in its own unit square (x across the brows, y down).
MEAN_FACE_FIVE_POINTS = ((0.2255, 0.2160), (0.7548, 0.2160), (0.4901, 0.5156),
                         (0.2541, 0.7802), (0.7261, 0.7802))


def chip_five_points(padding):
    """The five points of a crop made like dlib's face chips: the mean face's unit square grown
    by `padding` of its size on every side, then squared into the crop."""
    return tuple(((padding + x) / (1 + 2 * padding), (padding + y) / (1 + 2 * padding))
                 for x, y in MEAN_FACE_FIVE_POINTS)


# The 5-point template of 112x112 similarity-aligned faces, widely used for ArcFace-style
# alignment; Aff-Wild2's cropped_aligned frames are 112 px and aligned, RAF-DB's aligned images
# 100 px. Not checked here on either dataset's own frames: python eval.py show draws the masks.
ALIGNED_FIVE_POINTS = tuple((x / 112, y / 112) for x, y in (
    (38.29, 51.70), (73.53, 51.50), (56.03, 71.74), (41.55, 92.37), (70.73, 92.20)))
# UTKFace's "*.jpg.chip.jpg" 200-px crops are named and sized as dlib's face chips, whose
# default is size 200 with padding 0.2: the mean face's square grown by 20 % on every side.
UTKFACE_FIVE_POINTS = chip_five_points(0.2)
# FER2013's 48x48 crops, measured on its own faces: `python data.py layout --dataset fer2013
# --data-root DIR --count 1000` (measure_face_layout: the mean face of 1,000 training faces
# locates each part, then each face is matched against the mean face's patch around it).
# Eye centres (0.314, 0.389) and (0.657, 0.389), nose tip (0.493, 0.561), mouth centre
# (0.496, 0.781); the mean face alone puts the eyes at y 0.368 and the nose at 0.540. The
# quartiles over faces span about +-0.04 (2 px): the crops are tightly centred, and 92-96 % of
# the faces match each part's patch (correlation >= 0.5); the rest are the tilted, turned or
# covered ones.
FER2013_FIVE_POINTS = ((0.3137, 0.389), (0.6573, 0.389), (0.4926, 0.5609), (0.3427, 0.7812),
                       (0.6491, 0.7812))
# CK+48 is a tight detector crop without landmarks too: the mean face at padding 0.29 (the eye
# line near y 0.32), an inference from crops of other datasets, not a measurement on CK+48;
# python data.py layout and python eval.py show check it on a copy.
TIGHT_CROP_FIVE_POINTS = chip_five_points(0.29)
# CelebA's aligned images, when list_landmarks_align_celeba.txt is missing: approximately the
# means of that file (image-left eye first), in pixels of the 178x218 image.
CELEBA_MEAN_FIVE_POINTS = ((69.0, 111.5), (108.5, 111.5), (88.5, 135.0), (71.5, 152.5),
                           (105.5, 152.5))


def sample_landmarks(data, split="train", size=128, count=256):
    """The 68 landmarks (pixels of the crop the network sees, size x size) of up to `count`
    faces of `split` drawn evenly, as one (N, 68, 2) tensor; None when fewer than 16 of them
    carry landmarks."""
    samples = data.splits.get(split) or []
    step = max(1, len(samples) // count)
    dataset = FaceDataset(data, split, size, list(range(0, len(samples), step))[:count])
    landmarks = [item["landmarks"] for item in (dataset[i] for i in range(len(dataset)))
                 if "error" not in item and bool(item["has_landmarks"])]
    return torch.stack(landmarks) if len(landmarks) >= 16 else None


# ----------------------------------------------------------------------------------------------
# Loading by name.

READERS = {
    "affectnet": read_affectnet, "ckplus": read_ckplus, "300w_lp": read_300w_lp,
    "aflw2000": read_aflw2000, "biwi": read_biwi, "celeba": read_celeba,
    "utkface": read_utkface, "fer2013": read_fer2013, "ferplus": read_ferplus, "rafdb": read_rafdb,
    "folder": read_folder, "demo": read_demo, "affwild2": read_affwild2,
    "affwild2_va": functools.partial(read_affwild2, labels="va"),
    "affwild2_mtl": read_affwild2_mtl, "abaw_lsd": read_abaw_lsd,
}


CLASS_PROTOCOLS = ("affectnet", "ckplus")  # where `classes` picks a protocol: AffectNet 8/7, CK+ 7/8


def load(name, root=None, classes=None, cache_root=None):
    """FaceData for dataset `name` under `root`. `classes` picks the protocol where a dataset
    has several (AffectNet 8/7, CK+ 7/8); `cache_root` is where its prepared caches live."""
    if name not in READERS:
        raise UnknownName("dataset", name, READERS)
    if root is None and name != "demo":
        raise DatasetError(f"{name} needs its data root: the folder its download unpacked to")
    kwargs = {"classes": classes} if classes is not None and name in CLASS_PROTOCOLS else {}
    data = READERS[name](root, **kwargs)
    data.cache_root = cache_root
    if not any(data.splits.values()):
        raise DatasetError(f"{name}: no usable samples below {root} "
                           f"(skipped: {dict(sum(data.skipped.values(), Counter()))})")
    if "train" in data.splits and "val" not in data.splits:
        hold_out_validation(data)
    return data


def hold_out_validation(data):
    """A dataset that ships no validation split (RAF-DB, 300W-LP, a train/test folder): 10 % of
    train, by a hash of each file's name, becomes "val". Model selection then never sees the
    test split that the figures are reported on."""
    def key(sample):
        return os.path.basename(sample.image) if isinstance(sample.image, str) else repr(sample.box)
    train = data.splits["train"]
    data.splits["val"] = [s for s in train if hash_bucket(key(s)) == 0]
    data.splits["train"] = [s for s in train if hash_bucket(key(s)) != 0]
    data.skipped["val"] = Counter()


# ----------------------------------------------------------------------------------------------
# From a Sample to a tensor: decode, crop the face, resize.

def square_box(box, margin, width=None, height=None):
    """The face box grown by `margin` of its size on every side and made square around its
    centre (so resizing never distorts the face). None means the whole image."""
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def open_image(sample, size_hint=None):
    """RGB PIL image of a sample. JPEGs decode at a reduced scale when the face crop would
    still be at least `size_hint` pixels wide (PIL's draft mode: several times faster on
    AffectNet's large originals). Returns (image, scale of its pixels vs the original)."""
    if isinstance(sample.image, np.ndarray):
        return Image.fromarray(sample.image).convert("RGB"), 1.0
    if isinstance(sample.image, Image.Image):  # eval.predict's in-memory images
        return sample.image.convert("RGB"), 1.0
    image = Image.open(sample.image)
    width, height = image.size
    if size_hint and image.format == "JPEG":
        x0, y0, x1, y1 = square_box(sample.box, 0, width, height)
        scale = min(1.0, size_hint / max(1.0, x1 - x0))
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image = image.convert("RGB")
    return image, image.size[0] / width


class BoxOutsideImage(ValueError):
    pass


def load_face(sample, size, margin):
    """(uint8 (3, size, size) tensor, (68, 2) landmarks in crop pixels or None). Raises
    BoxOutsideImage, or what PIL raises for a corrupt file (OSError, ValueError, SyntaxError)."""
    image, scale = open_image(sample, size)
    full_w, full_h = image.size[0] / scale, image.size[1] / scale
    x0, y0, x1, y1 = square_box(sample.box, margin, full_w, full_h)
    visible_w = min(x1, full_w) - max(x0, 0)
    visible_h = min(y1, full_h) - max(y0, 0)
    if visible_w <= 0 or visible_h <= 0 or visible_w * visible_h < 0.1 * (x1 - x0) * (y1 - y0):
        raise BoxOutsideImage("face box (almost) entirely outside the image")
    # the parts of the square past the border are padded with black
    crop = image.crop(tuple(int(round(v * scale)) for v in (x0, y0, x1, y1)))
    crop = crop.resize((size, size), Image.BILINEAR, reducing_gap=None)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
    landmarks = None
    if sample.landmarks is not None:
        landmarks = (sample.landmarks - np.array([x0, y0], np.float32)) * (size / (x1 - x0))
    return pixels, landmarks


def target_tensor(data, sample):
    if data.task == "pose":
        return torch.tensor(sample.target, dtype=torch.float32)
    return torch.tensor(sample.target, dtype=torch.long)


def va_tensor(sample):
    return torch.tensor(sample.va if sample.va is not None else (-2.0, -2.0), dtype=torch.float32)


AU_COUNT = len(AU_NAMES)  # ABAW's action units


def au_tensor(sample):
    return torch.tensor(sample.au if sample.au is not None else (-1,) * AU_COUNT, dtype=torch.float32)


class FaceDataset(torch.utils.data.Dataset):
    """Decodes and crops on the fly (the plain reader). Items are dicts; a corrupt image or a
    box outside the image gives None, which `collate` drops and counts."""

    def __init__(self, data, split, size, indices=None):
        self.data, self.samples, self.size = data, data.splits[split], size
        self.indices = list(range(len(self.samples))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def targets(self):
        """Class targets of the items, in item order (for sampling and stratification)."""
        return torch.tensor([self.samples[i].target for i in self.indices]) \
            if self.data.task == "classify" else None

    def va_targets(self):
        """(N, 2) valence/arousal of the items, sentinels included (the GCN head's graph)."""
        return torch.stack([va_tensor(self.samples[i]) for i in self.indices])

    def au_targets(self):
        """(N, 12) action units of the items, -1 where unlabelled (the AUs' positive weights)."""
        return torch.stack([au_tensor(self.samples[i]) for i in self.indices])

    def __getitem__(self, i):
        sample = self.samples[self.indices[i]]
        try:
            image, landmarks = load_face(sample, self.size, self.data.margin)
        except BoxOutsideImage:
            return {"error": "face box outside the image", "source": str(sample.image)[:200]}
        except (OSError, ValueError, SyntaxError):  # PIL raises all three on bad files
            return {"error": "image unreadable or corrupt", "source": str(sample.image)[:200]}
        return make_item(image, landmarks, target_tensor(self.data, sample), va_tensor(sample),
                         au_tensor(sample))


def make_item(image, landmarks, target, va, au):
    has = landmarks is not None
    return {"image": image, "target": target, "va": va, "au": au,
            "landmarks": torch.as_tensor(landmarks if has else np.zeros((68, 2), np.float32)),
            "has_landmarks": torch.tensor(has)}


def collate(items):
    """Stack a batch, dropping the items that failed to load; "skipped" lists their errors so
    the training loop can count and report them (never a crash mid-epoch, never silent)."""
    good = [item for item in items if "error" not in item]
    batch = {key: torch.stack([item[key] for item in good]) for key in good[0]} if good else {}
    batch["skipped"] = [f"{item['source']}: {item['error']}" for item in items if "error" in item]
    return batch


# ----------------------------------------------------------------------------------------------
# The prepared cache: every face decoded, cropped and resized once, into a uint8 array on disk
# (memory-mapped when read). Training reads whole batches from it: no JPEG decoding per epoch.

CACHE_FOLDER = "hmtl_cache"  # inside a data root: the folder readers never take for data


class StaleCache(DatasetError):
    """The prepared cache was built from other data than the reader sees now."""


def writable(folder):
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_dir(data_root, data, size):
    """Where the prepared cache of one dataset at one size lives: in the dataset's cache root
    when one was given (load's cache_root); else <data-root>/hmtl_cache; else, for a dataset
    folder that cannot be written (a shared mount, a container volume), under
    ~/.cache/hmtl/prepared/, one folder per dataset root. Named by what the reader read: the
    dataset, its class protocol where it has several (AffectNet-8 or -7), and the size."""
    protocol = f"-{len(data.classes)}c" if data.name in CLASS_PROTOCOLS else ""
    tag = f"{data.name}{protocol}-{size}px"
    root = os.path.abspath(data_root or DEMO_DEFAULT_ROOT)
    cache_root = data.cache_root
    if cache_root is None:
        cache_root = os.path.join(root, CACHE_FOLDER)
        if not os.path.isdir(cache_root) and not writable(root):
            cache_root = os.path.join(USER_CACHE, "prepared",
                                      hashlib.md5(root.encode()).hexdigest()[:12])
    return os.path.join(cache_root, tag)


def split_fingerprint(samples, data_root):
    """What a split of the cache was built from: every sample's image (its path inside the
    dataset, size and modification time; or its pixels), label, box, landmarks and valence/
    arousal, in order. Any added, removed, relabelled or replaced image changes it; moving the
    whole dataset folder does not."""
    digest = hashlib.blake2b(digest_size=16)
    root = os.path.abspath(data_root or DEMO_DEFAULT_ROOT)
    for sample in samples:
        if isinstance(sample.image, str):
            try:
                stat = os.stat(sample.image)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:
                size = mtime = -1
            digest.update(f"{os.path.relpath(sample.image, root)}|{size}|{mtime}|".encode())
        else:
            digest.update(np.ascontiguousarray(sample.image).tobytes())
        digest.update(repr((sample.target, sample.box, sample.va, sample.subject, sample.au)).encode())
        if sample.landmarks is not None:
            digest.update(np.ascontiguousarray(sample.landmarks, dtype=np.float32).tobytes())
    return digest.hexdigest()


def fingerprint_of(data, split, data_root):
    """split_fingerprint, computed once per split of a FaceData."""
    if split not in data.fingerprints:
        data.fingerprints[split] = split_fingerprint(data.splits[split], data_root)
    return data.fingerprints[split]


def cache_changes(directory, data, data_root, splits=None):
    """[] when the cache at `directory` was built from the data as it is now; else one phrase
    per changed split."""
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    changes = []
    for split in splits or sorted(set(data.splits) | set(meta["splits"])):
        then = meta["splits"].get(split, {})
        if split not in data.splits:
            changes.append(f"{split} is gone")
        elif "fingerprint" not in then:
            changes.append(f"{split} was not in the cache, or the cache predates fingerprints")
        elif then["fingerprint"] != fingerprint_of(data, split, data_root):
            listed, now = then.get("listed"), len(data.splits[split])
            changes.append(f"{split} had {listed} samples, now {now}" if listed != now else
                           f"{split}: labels or image files changed ({now} samples)")
    return changes


def prepare(data, data_root, size, workers=None, progress=print):
    """Write every split of `data` into the cache (atomically: a temporary folder, then a
    rename, so an interrupted run leaves no half cache behind and can simply be rerun).
    Images that fail to load are skipped and counted in the cache's metadata. A cache built
    from other data (changed labels, added or replaced images) is rebuilt."""
    target = cache_dir(data_root, data, size)
    if os.path.exists(os.path.join(target, "meta.json")):
        changes = cache_changes(target, data, data_root)
        if not changes:
            return target
        progress(f"prepare {data.name}: the data changed since the cache was built "
                 f"({'; '.join(changes)}); rebuilding {target}")
    elif not target.startswith(os.path.join(os.path.abspath(data_root or DEMO_DEFAULT_ROOT), "")) \
            and data.cache_root is None:
        print(f"note: {data_root} is not writable; the prepared cache goes to {target} "
              f"(--cache-dir chooses another place)", file=sys.stderr)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = target + f".partial-{os.getpid()}"
    os.makedirs(temporary, exist_ok=True)
    meta = {"dataset": data.name, "size": size, "task": data.task, "classes": data.classes,
            "eval_split": data.eval_split, "folds": data.folds, "splits": {}}
    workers = workers or min(16, os.cpu_count() or 1)
    for split, samples in data.splits.items():
        n = len(samples)
        images = np.lib.format.open_memmap(os.path.join(temporary, f"{split}-images.npy"), "w+",
                                           np.uint8, (max(n, 1), size, size, 3))
        landmarks = np.zeros((n, 68, 2), np.float32)
        has = np.zeros(n, bool)
        ok = np.zeros(n, bool)
        errors = Counter(data.skipped.get(split, Counter()))
        dataset = FaceDataset(data, split, size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers,
                                             collate_fn=list, generator=torch.Generator())
        position = 0
        for items in loader:
            for item in items:
                if "error" in item:
                    errors[item["error"]] += 1
                else:
                    images[position] = item["image"].permute(1, 2, 0).numpy()
                    landmarks[position] = item["landmarks"].numpy()
                    has[position] = bool(item["has_landmarks"])
                    ok[position] = True
                position += 1
            progress(f"prepare {data.name}/{split}: {position}/{n}")
        images.flush()
        del images
        kept = np.flatnonzero(ok)
        targets = [samples[i].target for i in kept]
        np.savez(os.path.join(temporary, f"{split}-labels.npz"), kept=kept,
                 landmarks=landmarks[kept], has_landmarks=has[kept],
                 target=np.array(targets, dtype=np.float32 if data.task == "pose" else np.int64),
                 va=np.array([samples[i].va or (-2.0, -2.0) for i in kept], np.float32),
                 au=np.array([samples[i].au or (-1,) * AU_COUNT for i in kept], np.float32).reshape(-1, AU_COUNT),
                 subject=np.array([samples[i].subject or "" for i in kept]))
        meta["splits"][split] = {"samples": int(len(kept)), "skipped": dict(errors), "listed": n,
                                 "fingerprint": fingerprint_of(data, split, data_root)}
    with open(os.path.join(temporary, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(os.path.join(target, "meta.json")):
        if not cache_changes(target, data, data_root):
            shutil.rmtree(temporary)  # another process finished the same cache first: keep theirs
            return target
        stale = target + f".stale-{os.getpid()}"
        os.replace(target, stale)  # two renames: a reader never sees half of either
        os.replace(temporary, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, target)
    return target


class CachedDataset(torch.utils.data.Dataset):
    """A split of the prepared cache. `__getitems__` reads a whole batch with one indexed
    copy out of the memory map, which is what makes the CPU side fast."""

    def __init__(self, directory, split, indices=None):
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        labels = np.load(os.path.join(directory, f"{split}-labels.npz"))
        self.kept = labels["kept"]
        self.images_path, self._images = os.path.join(directory, f"{split}-images.npy"), None
        self.target = torch.from_numpy(labels["target"])
        self.landmarks = torch.from_numpy(labels["landmarks"])
        self.has_landmarks = torch.from_numpy(labels["has_landmarks"])
        self.va = torch.from_numpy(labels["va"])
        self.au = torch.from_numpy(labels["au"])
        self.indices = np.arange(len(self.kept)) if indices is None else np.asarray(indices)

    @property
    def images(self):
        """The images' memory map, opened in the process that reads it: a DataLoader worker
        started by spawn or forkserver (Python 3.14's default on Linux) gets the dataset
        pickled, and a pickled memory map is a full copy of the data (43 GB for AffectNet at
        224 px)."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.indices)

    def targets(self):
        return self.target[torch.from_numpy(self.indices)] if self.meta["task"] == "classify" else None

    def va_targets(self):
        return self.va[torch.from_numpy(self.indices)]

    def au_targets(self):
        return self.au[torch.from_numpy(self.indices)]

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, batch_indices):
        rows = self.indices[np.asarray(batch_indices)]
        order = np.argsort(rows)  # ascending reads from the memory map, then back in order
        images = np.empty((len(rows),) + self.images.shape[1:], np.uint8)
        images[order] = self.images[self.kept[rows[order]]]
        rows = torch.from_numpy(rows)
        return {"image": torch.from_numpy(images).permute(0, 3, 1, 2),
                "target": self.target[rows], "va": self.va[rows], "au": self.au[rows],
                "landmarks": self.landmarks[rows], "has_landmarks": self.has_landmarks[rows],
                "skipped": []}


def identity_collate(batch):
    """For a DataLoader over CachedDataset, whose __getitems__ already returns the batch."""
    return batch


def check_cache(data, size, data_root, splits=None):
    """Raise StaleCache, saying what changed and how to rebuild, when a prepared cache exists
    for `data` at `size` but was built from other data than the reader sees now."""
    directory = cache_dir(data_root, data, size)
    if not os.path.exists(os.path.join(directory, "meta.json")):
        return None
    changes = cache_changes(directory, data, data_root, splits)
    if changes:
        raise StaleCache(f"the prepared cache {directory} is stale ({'; '.join(changes)}): rebuild "
                         f"it: python data.py prepare --dataset {data.name} --data-root {data_root} "
                         f"--size {size}")
    return directory


def open_split(data, split, size, data_root, indices=None):
    """The prepared cache of `split` when there is one (python data.py prepare), else the
    plain reader, which decodes every image on the fly. A cache built from other data than the
    reader sees now is never used: StaleCache says what changed and how to rebuild."""
    directory = check_cache(data, size, data_root, [split])
    return FaceDataset(data, split, size, indices) if directory is None else \
        CachedDataset(directory, split, indices)


def leave_stop_signals_to_the_trainer(exiting, worker_id):
    """A loader worker ignores SIGINT, and SIGTERM until its parent exits. A signal to the
    whole process group (Ctrl-C in the shell, a batch scheduler's time limit, `kill -- -PGID`)
    would otherwise end the workers first, and the training process would die with
    "DataLoader worker exited" at its next batch instead of saving last.pt. The workers still
    end with the loader, or when their parent dies (torch's worker watchdog). When the parent
    exits with a loader still alive (a script or notebook that keeps one), multiprocessing
    stops the workers with SIGTERM and waits for them: `exiting`, set then (PARENT_EXITING),
    lets them go."""
    def end_if_the_parent_exits(signum, frame):
        if exiting.value:
            sys.exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, end_if_the_parent_exits)


# Shared memory that this process's loader workers inherit; set at exit. atexit runs its
# functions last registered first, so this runs before multiprocessing's own exit function
# (registered when torch imported multiprocessing), which sends the SIGTERM.
PARENT_EXITING = multiprocessing.RawValue("b", 0)
atexit.register(lambda: setattr(PARENT_EXITING, "value", 1))


def training_faces_used(data, size, data_root, fraction=1.0):
    """The training split, or the stratified `fraction` of it that a low-data run trains on:
    one fixed subset, drawn with seed 0, for every seed and variant (the paper's one split)."""
    train_set = open_split(data, "train", size, data_root)
    if fraction >= 1:
        return train_set
    targets = train_set.targets()
    if targets is None:
        raise UserError("--train-fraction needs class labels to stratify")
    return open_split(data, "train", size, data_root, stratified_fraction(targets.numpy(), fraction, 0))


def make_loader(dataset, batch_size, workers=0, sampler=None, drop_last=False, pin_memory=False):
    """A DataLoader for either kind of dataset, with the matching collate. Its workers end
    with the process, whoever still holds the loader or an iterator of it."""
    cached = isinstance(dataset, CachedDataset)
    # its own generator: creating a loader then draws nothing from the global RNG, which
    # dropout uses, so a resumed run replays the same random numbers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        collate_fn=identity_collate if cached else collate,
        worker_init_fn=functools.partial(leave_stop_signals_to_the_trainer, PARENT_EXITING),
        generator=torch.Generator().manual_seed(0))


class EpochSampler(torch.utils.data.Sampler):
    """The order of one epoch, a pure function of (seed, epoch): a permutation, or with
    `weights` a draw with replacement (oversampling). In distributed training each of `world`
    processes takes every world-th index. `skip` drops the first indices of this epoch, which
    is how an interrupted epoch resumes exactly where it stopped."""

    def __init__(self, size, seed=0, weights=None, rank=0, world=1):
        self.size, self.seed, self.weights = size, seed, weights
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.size // self.world - self.skip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        order = order[self.rank::self.world][:self.size // self.world]
        return iter(order[self.skip:].tolist())


# ----------------------------------------------------------------------------------------------
# Sampling: class-weighted loss (tasks.class_weights), oversampling, a stratified fraction.

def oversampling_weights(targets):
    """Per-sample weight 1 / n_c: every class drawn equally often in expectation (use with
    torch.utils.data.WeightedRandomSampler)."""
    targets = torch.as_tensor(targets)
    counts = torch.bincount(targets).float()
    return 1.0 / counts[targets]


def stratified_fraction(targets, fraction, seed=0):
    """Indices of a class-stratified `fraction` of the samples (at least one per class that
    has any), fixed by `seed`. The low-data experiment uses 0.2."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train fraction must be in (0, 1], not {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        keep = max(1, int(round(len(members) * fraction)))
        chosen.append(rng.choice(members, keep, replace=False))
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------------------------
# Augmentation, batched on the device. One random draw per sample for every parameter.
# Geometry is a single affine map per sample (rotation, zoom into a random crop, flip), applied
# with grid_sample; landmarks go through the same map, and a flip swaps left and right
# landmarks and negates yaw and roll.

AUGMENT_LEVELS = {
    # rotation (deg), crop fraction range, colour jitter p, grayscale p, blur p, down-up p,
    # noise p, cutout p (side 60/224 of the image)
    "none": dict(rotate=0, crop=(1.0, 1.0), jitter=0, gray=0, blur=0, downup=0, noise=0, cutout=0),
    "weak": dict(rotate=15, crop=(0.69, 0.99), jitter=0.4, gray=0.2, blur=0, downup=0, noise=0,
                 cutout=0),
    "strong": dict(rotate=25, crop=(0.6, 0.99), jitter=0.9, gray=0.3, blur=0.2, downup=0.2,
                   noise=0.5, cutout=0.5),
}

# 68-point flip: the index that lands on each position when the face is mirrored.
FLIP_LANDMARKS = tuple(list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] +
                       [35, 34, 33, 32, 31] + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] +
                       [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] +
                       [64, 63, 62, 61, 60, 67, 66, 65])


def augment(images, level, landmarks=None, pose=None, generator=None, flip=True):
    """Augment a batch of uint8 (N, 3, S, S) images on their device. Returns (normalised float
    images, landmarks moved with them, pose targets with yaw and roll negated where flipped).
    Head pose skips rotation (it would change the roll label): pass pose to get that."""
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"unknown augmentation level {level!r}; choose from {list(AUGMENT_LEVELS)}")
    n, _, h, w = images.shape
    theta, mirrored = random_geometry(n, level, pose is not None, flip, generator, images.device)
    x = images.float()
    if level != "none" or flip:  # else the map is the identity
        x = warp(x, theta)
    if landmarks is not None:
        landmarks = move_landmarks(landmarks.to(images.device).float(), theta, mirrored, w, h)
    if pose is not None:
        pose = pose.clone()
        pose[:, 0] = torch.where(mirrored, -pose[:, 0], pose[:, 0])  # yaw
        pose[:, 2] = torch.where(mirrored, -pose[:, 2], pose[:, 2])  # roll
    return models.normalize(photometric(x, level, generator).clamp(0, 255)), landmarks, pose


def uniform(shape, generator, device, low=0.0, high=1.0):
    """U(low, high) of `shape` on `device`, drawn from `generator` (on its own device)."""
    r = torch.rand(*shape, generator=generator,
                   device=generator.device if generator is not None else device)
    return r.to(device) * (high - low) + low


def random_geometry(n, level, keep_upright=False, flip=True, generator=None, device="cpu"):
    """Per sample: rotation, zoom into a random crop of the level's size range, and a flip
    with probability 1/2, as one affine map theta (N, 2, 3) from output to input coordinates
    (normalised to [-1, 1], as affine_grid wants). Returns (theta, mirrored)."""
    p = AUGMENT_LEVELS[level]
    angle = torch.deg2rad(uniform((n,), generator, device, -1, 1) * (0 if keep_upright else p["rotate"]))
    scale = uniform((n,), generator, device, *p["crop"])
    shift = (uniform((n, 2), generator, device) * 2 - 1) * (1 - scale)[:, None]  # stay inside
    mirrored = uniform((n,), generator, device) < (0.5 if flip else 0.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    sign = torch.where(mirrored, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
    return theta, mirrored


def warp(images, theta):
    """Resample float images through theta (bilinear; outside the image is black)."""
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def photometric(x, level, generator=None):
    """The level's colour and quality changes on float [0, 255] images, each applied to a
    random subset of the batch with its own parameters per sample."""
    p = AUGMENT_LEVELS[level]
    n, _, h, w = x.shape
    device = x.device

    def chosen(probability):
        return (uniform((n,), generator, device) < probability).view(n, 1, 1, 1)

    def factor():
        return uniform((n, 1, 1, 1), generator, device, 0.6, 1.4)

    if p["jitter"]:  # brightness, contrast, saturation, each x U(0.6, 1.4)
        jittered = x * factor()
        mean = grayscale(jittered).mean((2, 3), keepdim=True)
        jittered = (jittered - mean) * factor() + mean
        gray = grayscale(jittered)
        jittered = (jittered - gray) * factor() + gray
        x = torch.where(chosen(p["jitter"]), jittered, x)
    if p["gray"]:
        x = torch.where(chosen(p["gray"]), grayscale(x).expand_as(x), x)
    if p["blur"]:  # 5x5 binomial kernel
        kernel = models.device_constant((1.0, 4.0, 6.0, 4.0, 1.0), device)
        kernel = (kernel[:, None] * kernel[None, :] / 256).expand(3, 1, 5, 5)
        blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
        x = torch.where(chosen(p["blur"]), blurred, x)
    if p["downup"]:  # down to a third and back up: low-resolution faces
        small = F.interpolate(x, size=(h // 3, w // 3), mode="bilinear", align_corners=False)
        x = torch.where(chosen(p["downup"]),
                        F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), x)
    if p["noise"]:  # Gaussian, sigma up to 12 grey levels
        sigma = uniform((n, 1, 1, 1), generator, device, 0, 12.0) * chosen(p["noise"])
        noise = torch.randn(x.shape, generator=generator,
                            device=generator.device if generator is not None else device)
        x = x + noise.to(device) * sigma
    if p["cutout"]:  # one square of 60/224 of the side, filled with the mean colour
        side = 60 / 224
        corner = uniform((n, 2), generator, device) * (1 - side)
        ys = torch.arange(h, device=device).view(1, h, 1) / h
        xs = torch.arange(w, device=device).view(1, 1, w) / w
        box = ((ys >= corner[:, 1, None, None]) & (ys < corner[:, 1, None, None] + side) &
               (xs >= corner[:, 0, None, None]) & (xs < corner[:, 0, None, None] + side))
        mean = models.per_channel(models.IMAGENET_MEAN, device) * 255
        x = torch.where(box[:, None] & chosen(p["cutout"]), mean, x)
    return x


def grayscale(images):
    """ITU-R 601 luma, (N, 1, H, W)."""
    weights = models.device_constant((0.299, 0.587, 0.114), images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def move_landmarks(landmarks, theta, mirrored, width, height):
    """Map landmarks (N, 68, 2) in input pixels through the inverse of the sampling map theta
    (which takes output coordinates to input coordinates), then re-index mirrored faces so
    that point i is again the subject's point i."""
    size = models.device_constant((width, height), landmarks.device, landmarks.dtype)
    normalised = landmarks / size * 2 - 1
    (a, b), (c, d) = theta[:, 0, :2].unbind(1), theta[:, 1, :2].unbind(1)
    x, y = (normalised - theta[:, None, :, 2]).unbind(2)
    # the 2x2 inverse in closed form (a rotation and a zoom: never singular), not
    # torch.linalg.solve, whose error check makes the host wait for the device
    det = (a * d - b * c)[:, None]
    out = torch.stack([(d[:, None] * x - b[:, None] * y) / det,
                       (a[:, None] * y - c[:, None] * x) / det], 2)
    out = (out + 1) / 2 * size
    flipped = out[:, models.device_constant(FLIP_LANDMARKS, out.device, torch.long)]
    return torch.where(mirrored.view(-1, 1, 1), flipped, out)


# ----------------------------------------------------------------------------------------------
# The summary command: what is in a copy of a dataset, before a 10-hour run.

def reading_report(data):
    """The lines a run logs about what its reader found: the copy's protocol note, and the
    files or rows it skipped, by split and reason."""
    lines = [f"note: {data.note}"] if data.note else []
    for split, reasons in data.skipped.items():
        if reasons:
            lines.append(f"{data.name}/{split}: skipped " + ", ".join(
                f"{count} ({reason})" for reason, count in sorted(reasons.items())))
    return lines


# Where the eyes, nose and mouth sit in a dataset of tight crops without landmarks (FER2013):
# measured on its own faces rather than assumed. The mean face of many crops shows each part as
# a dark (eyes, mouth) or bright (nose tip) blob; a patch of it around each part is then found
# again in every face by normalised cross-correlation, which gives the spread over faces and
# counts the faces where a part matches poorly (tilted, turned or occluded faces).
FEATURE_WINDOWS = {  # where to look for each part in the mean face (fractions x0, y0, x1, y1)
    "right_eye": (0.10, 0.20, 0.48, 0.55), "left_eye": (0.52, 0.20, 0.90, 0.55),
    "mouth": (0.30, 0.62, 0.70, 0.95),
}


def grey_faces(data, split, size, count, seed=0):
    """Up to `count` faces of `split`, drawn evenly at random, as (N, size, size) float grey."""
    samples = data.splits[split]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(samples), min(count, len(samples)), replace=False).tolist())
    items = [item for item in FaceDataset(data, split, size, picked) if "error" not in item]
    return np.stack([item["image"].float().mean(0).numpy() for item in items])


def subpixel_extremum(values, y, x):
    """(x, y) of a grid extremum refined by a parabola through it and its neighbours."""
    def offset(minus, centre, plus):
        curvature = minus - 2 * centre + plus
        return 0.0 if curvature == 0 else 0.5 * (minus - plus) / curvature
    h, w = values.shape
    dx = offset(values[y, x - 1], values[y, x], values[y, x + 1]) if 0 < x < w - 1 else 0.0
    dy = offset(values[y - 1, x], values[y, x], values[y + 1, x]) if 0 < y < h - 1 else 0.0
    return x + dx, y + dy


def mean_face_points(mean):
    """Pixel (x, y) of the eyes and mouth (darkest against their surroundings, in their
    windows) and the nose tip (brightest between the eye line and the mouth, near the middle
    column) in a mean face. Against the surroundings: the mean face minus its blur over a fifth
    of its side, so that a dark background at the border is not taken for an eye."""
    size = mean.shape[0]

    def box_blur(image, radius):
        padded = np.pad(image, radius, mode="reflect")
        side = 2 * radius + 1
        return sum(padded[dy:dy + size, dx:dx + size] for dy in range(side) for dx in range(side)) / side ** 2

    smooth = box_blur(mean, 1) - box_blur(mean, max(2, size // 10))

    def extremum(window, darkest=True):
        x0, y0, x1, y1 = (int(round(v * size)) for v in window)
        part = smooth[y0:y1, x0:x1]
        y, x = np.unravel_index(np.argmin(part) if darkest else np.argmax(part), part.shape)
        px, py = subpixel_extremum(smooth, y + y0, x + x0)
        return float(px), float(py)

    points = {name: extremum(window) for name, window in FEATURE_WINDOWS.items()}
    eye_y = (points["right_eye"][1] + points["left_eye"][1]) / 2
    # the mouth is a horizontal band: its darkest point may lie anywhere along it, so its
    # centre is taken on the face's axis, between the eyes
    points["mouth"] = ((points["right_eye"][0] + points["left_eye"][0]) / 2, points["mouth"][1])
    points["nose"] = extremum((0.40, (eye_y / size) + 0.10, 0.60, points["mouth"][1] / size - 0.08),
                              darkest=False)
    return points


def match_points(faces, mean, points, patch=None, search=None):
    """Each part's position in every face: the shift of the mean face's patch around it with
    the highest normalised cross-correlation, within +-`search` pixels. Returns
    {part: (positions (N, 2), peak correlation (N,))}."""
    n, size, _ = faces.shape
    patch = patch or max(5, size // 6)
    search = search or max(2, size // 8)
    found = {}
    for name, (px, py) in points.items():
        cx, cy = int(round(px)), int(round(py))
        x0, y0 = cx - patch // 2, cy - patch // 2
        template = mean[y0:y0 + patch, x0:x0 + patch]
        template = (template - template.mean()) / (template.std() + 1e-6)
        best = np.full(n, -np.inf)
        where = np.zeros((n, 2))
        for dy in range(-search, search + 1):
            for dx in range(-search, search + 1):
                if not (0 <= y0 + dy and y0 + dy + patch <= size and 0 <= x0 + dx and x0 + dx + patch <= size):
                    continue
                window = faces[:, y0 + dy:y0 + dy + patch, x0 + dx:x0 + dx + patch].reshape(n, -1)
                window = (window - window.mean(1, keepdims=True)) / (window.std(1, keepdims=True) + 1e-6)
                score = window @ template.reshape(-1) / template.size
                better = score > best
                best[better] = score[better]
                where[better] = (px + dx, py + dy)
        found[name] = (where, best)
    return found


def measure_face_layout(data, split="train", size=48, count=1000, seed=0, good=0.5):
    """The five points (eye centres, nose tip, mouth corners; pixels of a size x size crop) of
    `data`'s crops, measured on up to `count` faces: the median over the faces whose part
    matched with correlation >= `good`. Also each part's mean-face position, quartiles and the
    share of faces that matched. The mouth corners sit at +-0.446 eye distances from the mouth
    centre (the mean face's proportion, MEAN_FACE_FIVE_POINTS); only their midpoint
    places a region."""
    faces = grey_faces(data, split, size, count, seed)
    mean = faces.mean(0)
    points = mean_face_points(mean)
    report = {"faces": len(faces), "size": size, "parts": {}}
    median = {}
    for name, (where, peak) in match_points(faces, mean, points).items():
        kept = where[peak >= good]
        median[name] = np.median(kept, 0) if len(kept) else np.array(points[name])
        report["parts"][name] = {
            "mean_face": [round(v / size, 4) for v in points[name]],
            "median": [round(float(v) / size, 4) for v in median[name]],
            "quartiles": [[round(float(v) / size, 4) for v in np.percentile(kept[:, k], (25, 75))]
                          for k in range(2)] if len(kept) else None,
            "matched": round(float((peak >= good).mean()), 3)}
    (rx, ry), (lx, ly) = median["right_eye"], median["left_eye"]
    half_mouth = 0.446 * float(np.hypot(lx - rx, ly - ry))
    mx, my = median["mouth"]
    five = [(rx, ry), (lx, ly), tuple(median["nose"]), (mx - half_mouth, my), (mx + half_mouth, my)]
    report["five_points"] = [[round(float(v) / size, 4) for v in p] for p in five]
    return report


def summarize(data, verify=False, size=64):
    """Per split: samples per class (by name) or angle ranges, skipped rows by reason; with
    `verify`, every image is also decoded and cropped (slow) and failures counted."""
    report = {"dataset": data.name, "task": data.task, "classes": data.classes, "note": data.note,
              "splits": {}}
    for split, samples in data.splits.items():
        entry = {"samples": len(samples), "skipped": dict(data.skipped.get(split, {}))}
        if data.task == "classify":
            entry["per_class"] = dict(zip(data.classes, data.counts(split)))
        elif data.task == "pose" and samples:
            angles = np.array([s.target for s in samples])
            entry["angles"] = {name: [round(float(angles[:, k].min()), 1),
                                      round(float(angles[:, k].max()), 1)]
                               for k, name in enumerate(("yaw", "pitch", "roll"))}
        entry["with_landmarks"] = sum(s.landmarks is not None for s in samples)
        if "au" in data.labels:  # frames labelled per task (to compare with the challenge's published counts)
            entry["labelled_for"] = task_label_counts(samples)
        if verify:
            failures = Counter()
            for item in FaceDataset(data, split, size):
                if "error" in item:
                    failures[item["error"]] += 1
            entry["skipped"].update(failures)
            entry["samples"] -= sum(failures.values())
        report["splits"][split] = entry
    if data.folds:
        per_subject = Counter(s.subject for s in data.splits["all"])
        report["folds"] = [{"subjects": f, "images": sum(per_subject[s] for s in f)}
                           for f in data.folds]
    return report


def print_summary(report):
    print(f"{report['dataset']} ({report['task']})")
    if report.get("note"):
        print(f"  note: {report['note']}")
    for split, entry in report["splits"].items():
        print(f"  {split}: {entry['samples']} samples, {entry['with_landmarks']} with landmarks")
        if "labelled_for" in entry:
            print("    labelled for " + ", ".join(f"{task} {n}" for task, n in entry["labelled_for"].items()))
        for name, count in entry.get("per_class", {}).items():
            print(f"    {name:12} {count}")
        for name, (low, high) in entry.get("angles", {}).items():
            print(f"    {name:6} {low:7.1f} .. {high:6.1f} degrees")
        for reason, count in sorted(entry["skipped"].items(), key=lambda kv: -kv[1]):
            print(f"    skipped {count:6}  {reason}")
    for i, fold in enumerate(report.get("folds") or []):
        print(f"  fold {i}: {fold['images']} images, subjects {' '.join(fold['subjects'])}")


DATA_COMMANDS = ("summary", "prepare", "layout")
# Every program's subcommands (eval.py's are its COMMANDS; a test keeps the two alike), so that
# a word given to the wrong program, or to the one a command moved from, says where it is.
PROGRAM_COMMANDS = {"data.py": DATA_COMMANDS, "train.py": (),
                    "eval.py": ("score", "blend", "predict", "export", "features", "heads",
                                "convert-hsemotion", "show")}


def check_command(argv, program):
    """The first word of `program`'s command line, checked before any flag is parsed (a flag
    meant for another program would otherwise stop argparse first): another program's command
    names that program, a mistyped one the closest commands. Raises UserError."""
    if not argv or argv[0].startswith("-") or argv[0] in PROGRAM_COMMANDS[program]:
        return
    word, own = argv[0], PROGRAM_COMMANDS[program]
    owner = next((name for name, commands in PROGRAM_COMMANDS.items() if word in commands), None)
    if owner:
        raise UserError(f"{word} is a command of {owner}, not of {program}: python {owner} {' '.join(argv)}")
    if own and difflib.get_close_matches(word, own, n=1, cutoff=0.5):
        raise UnknownName("command", word, own)
    elsewhere = [f"python {name} {command}" for name, commands in PROGRAM_COMMANDS.items()
                 for command in difflib.get_close_matches(word, commands, n=1, cutoff=0.5)]
    hint = f"did you mean {' or '.join(elsewhere)}? " if elsewhere else ""
    what = f"choose from {', '.join(own)}" if own else f"{program} takes flags only (--help lists them)"
    raise UserError(f"unknown command {word!r}; {hint}{what}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="HMTL datasets: check a copy, prepare a cache, "
                                                 "measure where the faces' parts sit.")
    parser.add_argument("command", help="summary, prepare or layout")
    parser.add_argument("--dataset", default="demo", help=f"one of {', '.join(READERS)}")
    parser.add_argument("--data-root", help="the dataset's folder, as downloaded")
    parser.add_argument("--classes", type=int, help="protocol: AffectNet 8|7, CK+ 7|8")
    parser.add_argument("--size", type=int, help="face crop side in pixels (prepare: 224, layout: 48)")
    parser.add_argument("--workers", type=int, help="prepare: decoding processes")
    parser.add_argument("--verify", action="store_true", help="summary: decode every image")
    parser.add_argument("--cache-dir", help="prepare: where the cache goes (default: "
                                            "<data-root>/hmtl_cache, or ~/.cache/hmtl/prepared/)")
    parser.add_argument("--count", type=int, default=1000, help="layout: faces to measure")
    parser.add_argument("--json", action="store_true")
    try:
        check_command(sys.argv[1:] if argv is None else argv, "data.py")
        args = parser.parse_args(argv)
        check_command([args.command], "data.py")  # also when flags came before it
        data = load(args.dataset, args.data_root, args.classes, args.cache_dir)
        if args.command == "summary":
            report = summarize(data, args.verify)
            print(json.dumps(report, indent=1)) if args.json else print_summary(report)
            return report
        if args.command == "layout":
            report = measure_face_layout(data, size=args.size or 48, count=args.count)
            print(json.dumps(report, indent=1))
            return report
        directory = prepare(data, args.data_root, args.size or 224, args.workers,
                            progress=lambda line: print(line, file=sys.stderr))
        print(directory)
        return directory
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
