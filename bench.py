"""Throughput and memory benchmarks, always side by side in one run.

Shared machines are noisy, so absolute numbers drift between runs; what this script reports
with confidence are ratios between contenders measured in the same process, interleaved
round by round (contender A, contender B, A, B, ...) and summarised by the median round.

    python bench.py                      # CPU: small images and batch; CUDA: 224 px, bf16 AMP
    python bench.py --arch b0 --size 224 --batch 128 --steps 20 --json

Parts (`python bench.py models hmtl`; default: models hmtl data predict):
  models   the training step (forward, backward, optimizer step) of the hand-written
           EfficientNet (models.py) against torchvision's, B0 and B2; the hand-written one
           also with memory_efficient=True.
  hmtl     the HMTL training step (joint loss, pretext transform batched on the device) with
           puzzling and with in-painting, against plain supervised learning (SL); also the
           expression + valence/arousal task (expr_va) with its linear and its GCN head, and
           ABAW's multi-task head (mtl: VA + 8 expressions + 12 AUs, each term masked).
  predict  eval.predict on an in-memory uint8 batch against the bare forward of the same
           model on the same (normalised) batch.
  e2e      train.py end to end (data + step + validation), SL vs puzzle vs in-painting: one
           demo epoch (its recipe: 48 px) on the CPU; 224 px, B0 and B2, on CUDA, with the
           projected time of one AffectNet-8 epoch (287,651 images)
  data     the input pipeline against the B0 training step it feeds: the plain reader
           (decode + crop + strong augmentation per sample, 1 core), the prepared cache (read +
           collate whole batches, 1 core), the strong augmentation batched on the device.
  fingerprint  the prepared cache's staleness check at AffectNet's 287,651 rows, against the
           per-row existence check that the reader makes anyway (not in the default parts).
  smoke    on a CUDA machine: the GPU-only tests, then the GPU figures (B0, 224 px, bf16);
           a few minutes.
  reader   --dataset affwild2_mtl at s-Aff-Wild2's 169,209 rows, against the bare CSV parse
           of the same files (not in the default parts).
  cpu      the FER2013 recipes' training step (train.train_step, 64 px, batch 64) on the CPU:
           the default against channels_last off, bf16 autocast, torch.compile; then the
           batch size in faces/s; --profile adds the operators that take the time.
  cpu-jobs the same step as one run on all cores against one run per core at once (what
           train.py --compare --jobs N does), and against that oversubscribed (every run on
           all threads), in faces/s of the whole machine.

Memory: "activation MiB" is what autograd keeps for backward during one forward pass (the
dominant, batch-proportional term, measured exactly on any device); "peak MiB" is
torch.cuda.max_memory_allocated over a training step, on CUDA only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import models


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_mib(model, images, autocast):
    """Bytes autograd saves for backward in one forward pass, counting each storage once."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        model(images)
    return sum(storages.values()) / 2**20


def make_step(model, compute_loss, autocast):
    """One optimisation step as train.py does it: the loss under autocast, backward, fused
    AdamW (train.make_optimizer's)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        with autocast():
            loss = compute_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def random_batch(args, device):
    """The same seeded batch of images and labels for every contender."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    return images.contiguous(memory_format=memory_format(args)), labels


def memory_format(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


def race(contenders, device, steps, rounds, warmup=2):
    """Time each contender's step() for `steps` steps per round, interleaving contenders
    within each round; return {name: [seconds per step, one per round]}."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def paired_ratio(reference_times, times, label):
    """Speed relative to the reference, round by round (each round timed both back to back, so
    slow drifts of a shared machine cancel): the median ratio and the range over rounds."""
    ratios = sorted(r / t for r, t in zip(reference_times, times))
    return {f"ratio_{label}": statistics.median(ratios),
            f"ratio_{label}_min": ratios[0], f"ratio_{label}_max": ratios[-1]}


def whole_job_rows(part, count, contenders, rounds=3):
    """Contenders that each time one whole job (`run()` returns its seconds) over `count`
    items: interleaved rounds, the median, rows relative to the first contender."""
    times = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, (_, run) in contenders.items():
            times[key].append(run())
    seconds = {key: statistics.median(values) for key, values in times.items()}
    baseline = next(iter(contenders))
    ratio = {key: seconds[baseline] / seconds[key] for key in contenders}
    return [dict(part=part, arch="-", model=label, images_per_s=count / seconds[key],
                 seconds=seconds[key], **{f"ratio_vs_{baseline}{end}": ratio[key]
                                          for end in ("", "_min", "_max")}, peak_mib=None)
            for key, (label, _) in contenders.items()]


def peak_mib(step, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_models(args, device, autocast):
    """Hand-written vs torchvision EfficientNet training step, B0 and B2."""
    import torchvision  # the reference; only the benchmark and the tests import it

    rows = []
    for arch in args.arch:
        builders = {
            "hand-written": lambda: models.efficientnet(arch, args.classes),
            "hand-written, memory_efficient": lambda: models.efficientnet(
                arch, args.classes, memory_efficient=True),
            "torchvision": lambda: getattr(torchvision.models, f"efficientnet_{arch}")(
                num_classes=args.classes),
        }
        images, labels = random_batch(args, device)
        nets, steps = {}, {}
        for name, build in builders.items():
            net = build().to(device, memory_format=memory_format(args)).train()
            nets[name] = torch.compile(net) if args.compile else net
            steps[name] = make_step(
                nets[name], lambda net=nets[name]: F.cross_entropy(net(images), labels), autocast)
        times = race(steps, device, args.steps, args.rounds)
        for name in builders:
            rows.append(dict(
                part="models", arch=arch, model=name,
                images_per_s=args.batch / statistics.median(times[name]),
                **paired_ratio(times["torchvision"], times[name], "vs_torchvision"),
                activation_mib=activation_mib(nets[name], images, autocast),
                peak_mib=peak_mib(steps[name], device)))
    return rows


def bench_hmtl(args, device, autocast):
    """HMTL training step (joint loss: task + pretext, pretext transform on the device)
    against plain supervised learning, same batch and size; and the expression +
    valence/arousal task with its linear head and with the Emotion-GCN head."""
    import hmtl
    import tasks
    import train

    rows = []
    classes = [f"class {c}" for c in range(args.classes)]
    for arch in args.arch:
        images, labels = random_batch(args, device)
        va = torch.rand(args.batch, 2, device=device) * 2 - 1
        graph = tasks.emotion_graph(labels.cpu(), va.cpu(), args.classes)
        contenders = {"SL": dict(ssl="none"), "SL + puzzle": dict(ssl="puzzle"),
                      "SL + inpaint (perceptual: backbone)": dict(ssl="inpaint"),
                      "SL expr_va": dict(task="expr_va"),
                      "SL expr_va, GCN head": dict(task="expr_va", head="gcn"),
                      "SL mtl (VA + expressions + 12 AUs)": dict(task="mtl")}
        # every label a batch can carry; each task's loss reads its own (tasks.TASKS[...].labels)
        targets = {"target": labels, "va": va,
                   "au": torch.randint(0, 2, (args.batch, 12), device=device).float()}
        steps = {}
        for name, config in contenders.items():
            config = {**train.DEFAULTS, "arch": arch, "image_size": args.size, **config}
            net = hmtl.build(config, classes, graph=graph).to(
                device, memory_format=memory_format(args)).train()
            steps[name] = make_step(
                net, lambda net=net, targets=targets: net.losses(images, targets)[0]["loss"],
                autocast)
        times = race(steps, device, args.steps, args.rounds)
        for name in contenders:
            rows.append(dict(
                part="hmtl", arch=arch, model=name,
                images_per_s=args.batch / statistics.median(times[name]),
                **paired_ratio(times["SL"], times[name], "vs_sl"),
                peak_mib=peak_mib(steps[name], device)))
    return rows



def bench_predict(args, device, autocast):
    """eval.predict on an in-memory uint8 batch (resize, normalisation, forward under bf16
    autocast on CUDA, one result dict per image) against the bare forward of the same model on
    the same batch, already normalised at the model's size: what the convenience costs."""
    import eval as evaluation
    import hmtl
    import train

    rows = []
    for arch in args.arch:
        torch.manual_seed(0)
        config = {**train.DEFAULTS, "arch": arch, "image_size": args.size}
        model = hmtl.build(config, [f"class {c}" for c in range(args.classes)]).to(
            device, memory_format=memory_format(args)).eval()
        pixels = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
        normalised = models.normalize(pixels.to(device)).contiguous(memory_format=memory_format(args))

        @torch.no_grad()
        def bare():
            with autocast():
                model(normalised).float().cpu()

        def predict():
            evaluation.predict(model, pixels, batch_size=args.batch)
        times = race({"forward": bare, "predict": predict}, device, args.steps, args.rounds)
        for name, label in (("forward", "bare model forward"), ("predict", "eval.predict")):
            rows.append(dict(part="predict", arch=arch, model=label,
                             images_per_s=args.batch / statistics.median(times[name]),
                             **paired_ratio(times["forward"], times[name], "vs_forward"),
                             peak_mib=None))
    return rows

def bench_data(args, device, autocast):
    """Can the input pipeline feed the training step? On `args.data_size` px faces from
    synthetic 800x600 JPEGs (AffectNet's originals are of that order):
      (a) the plain reader, decoding + cropping (+ strong augmentation) per sample, 1 core;
      (b) the prepared cache, reading + collating whole batches, 1 core;
      the strong augmentation batched on the device, and the B0 training step on the device.
    Ratios: throughput relative to the training step (> 1: faster than the step it feeds)."""
    import tempfile

    import numpy as np
    from PIL import Image

    import data

    size, batch, count = args.data_size, args.batch, args.data_images
    rows = []
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        smooth = np.kron(rng.integers(0, 256, (60, 80, 3)), np.ones((10, 10, 1))).astype(np.uint8)
        samples = []
        for i in range(count):
            pixels = np.clip(smooth.astype(np.int16) + rng.integers(-20, 20, smooth.shape), 0, 255)
            path = os.path.join(root, f"{i}.jpg")
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
            samples.append(data.Sample(path, i % 8, (250.0, 150.0, 550.0, 450.0),
                                       np.full((68, 2), 400.0, np.float32)))
        faces = data.FaceData("synthetic", "classify", [str(c) for c in range(8)],
                              {"train": samples}, {"train": {}}, "train")
        plain = data.FaceDataset(faces, "train", size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per core
        try:
            def read_plain(augment):
                start = time.perf_counter()
                for first in range(0, count, batch):
                    items = data.collate([plain[i] for i in range(first, min(count, first + batch))])
                    if augment:
                        data.augment(items["image"], "strong", items["landmarks"])
                return count / (time.perf_counter() - start)
            decode = statistics.median(read_plain(False) for _ in range(3))
            decode_augment = statistics.median(read_plain(True) for _ in range(3))
            directory = data.prepare(faces, root, size, workers=0, progress=lambda line: None)
            cached = data.CachedDataset(directory, "train")
            order = np.random.default_rng(1).permutation(np.tile(np.arange(count), 8))

            def read_cache():
                start = time.perf_counter()
                for first in range(0, len(order) - batch + 1, batch):
                    cached.__getitems__(order[first:first + batch])
                return (len(order) // batch * batch) / (time.perf_counter() - start)
            cache_rate = statistics.median(read_cache() for _ in range(3))
        finally:
            torch.set_num_threads(threads)

        images = cached.__getitems__(np.arange(batch) % count)
        uint8_batch = images["image"].to(device).contiguous(memory_format=memory_format(args))
        landmarks = images["landmarks"].to(device)
        model = models.efficientnet("b0", 8).to(device, memory_format=memory_format(args)).train()
        labels = torch.randint(0, 8, (batch,), device=device)
        normalised = models.normalize(uint8_batch).contiguous(memory_format=memory_format(args))
        step = make_step(model, lambda: F.cross_entropy(model(normalised), labels), autocast)
        times = race({"augment": lambda: data.augment(uint8_batch, "strong", landmarks),
                      "step": step}, device, args.steps, args.rounds)
        step_rate = batch / statistics.median(times["step"])
        augment_rate = batch / statistics.median(times["augment"])

    def row(name, rate):
        ratio = rate / step_rate
        return dict(part="data", arch="b0", model=name, images_per_s=rate, ratio_vs_step=ratio,
                    ratio_vs_step_min=ratio, ratio_vs_step_max=ratio, peak_mib=None)
    rows += [row("(a) plain: decode + crop, 1 core", decode),
             row("(a) plain: + strong augment, 1 core", decode_augment),
             row("(b) cache: read + collate, 1 core", cache_rate),
             row(f"strong augment, batched, {device.type}", augment_rate),
             row(f"B0 training step, {device.type}", step_rate)]
    rows[-2]["share_of_step"] = step_rate / augment_rate  # augmentation time / step time
    return rows


def bench_fingerprint(args, device, autocast):
    """The prepared cache's staleness check (data.split_fingerprint: every image's path, size
    and modification time, plus every label, box, 68 landmarks and valence/arousal) at
    AffectNet's size: `--fingerprint-images` (default 287,651) files on local disk. Against
    the check that the reader already makes for every row (os.path.exists), in the same run."""
    import tempfile

    import numpy as np

    import data

    count = args.fingerprint_images
    with tempfile.TemporaryDirectory() as root:
        samples = []
        for i in range(count):
            folder = os.path.join(root, f"{i // 1000:03d}")
            if i % 1000 == 0:
                os.makedirs(folder)
            path = os.path.join(folder, f"{i}.jpg")
            with open(path, "wb") as f:
                f.write(b"\xff\xd8")
            samples.append(data.Sample(path, i % 8, (10.0, 20.0, 110.0, 120.0),
                                       np.full((68, 2), float(i % 97), np.float32), (0.1, -0.2)))

        def exists():
            start = time.perf_counter()
            sum(os.path.exists(s.image) for s in samples)
            return time.perf_counter() - start

        def fingerprint():
            start = time.perf_counter()
            data.split_fingerprint(samples, root)
            return time.perf_counter() - start
        return whole_job_rows("fingerprint", count, {
            "exists": (f"os.path.exists per row, {count} rows", exists),
            "fingerprint": (f"data.split_fingerprint, {count} rows", fingerprint)})


def bench_reader(args, device, autocast):
    """`--dataset affwild2_mtl` read at s-Aff-Wild2's size (the challenge's size: 142,333 training and
    26,876 validation rows, one 0-byte frame file per row, 500 frames per video folder), every
    task's mask and the per-task counts included; against the bare parse of the same two files
    (csv.reader and float() of every field), in the same run."""
    import csv
    import tempfile

    import data

    sizes = {"training_set_annotations.txt": args.reader_rows,
             "validation_set_annotations.txt": args.reader_rows * 26876 // 142333}
    header = "image,valence,arousal,expression," + ",".join(data.AU_NAMES)
    with tempfile.TemporaryDirectory() as root:
        frame = 0
        for filename, count in sizes.items():
            lines = [header]
            for i in range(count):
                video, name = f"{frame // 500:04d}", f"{frame % 500:05d}.jpg"
                if frame % 500 == 0:
                    os.makedirs(os.path.join(root, "cropped_aligned", video))
                open(os.path.join(root, "cropped_aligned", video, name), "wb").close()
                # every task labelled on some frames and missing on others, as in the release
                va = "-5,-5" if i % 4 == 0 else f"{(i % 21 - 10) / 10},{(i % 17 - 8) / 10}"
                units = ",".join(["-1"] * 12) if i % 4 == 1 else \
                    ",".join(str((i >> bit) & 1) for bit in range(12))
                lines.append(f"{video}/{name},{va},{i % 9 - 1},{units}")
                frame += 1
            with open(os.path.join(root, filename), "w", newline="") as f:
                f.write("\r\n".join(lines) + "\r\n")  # CRLF, as the release ships it

        def parse():
            start = time.perf_counter()
            for filename in sizes:
                with open(os.path.join(root, filename), newline="") as f:
                    rows = csv.reader(f)
                    next(rows)
                    for row in rows:
                        [float(v) for v in row[1:]]
            return time.perf_counter() - start

        def load():
            start = time.perf_counter()
            faces = data.load("affwild2_mtl", root)
            data.task_label_counts(faces.splits["train"])
            assert sum(map(len, faces.splits.values())) == sum(sizes.values())
            return time.perf_counter() - start
        rows = sum(sizes.values())
        return whole_job_rows("reader", rows, {
            "parse": (f"csv + float() only, {rows} rows", parse),
            "load": (f"data.load('affwild2_mtl'), {rows} rows", load)})


def bench_e2e(args, device, autocast):
    """The real training loop (train.py: data + augmentation + joint loss + step + the
    per-epoch validation), SL vs puzzle vs in-painting. CPU: one full demo epoch at 48 px,
    B0. CUDA: `args.steps * 10` steps at 224 px with `args.batch`, B0 and B2, from the demo's
    prepared cache. Reports images/s of the loop and the projected AffectNet-8 epoch."""
    import json
    import tempfile

    import train

    on_gpu = device.type == "cuda"
    rows = []
    for arch in (args.arch if on_gpu else ["b0"]):
        rates = {}
        for name, ssl in (("SL", "none"), ("SL + puzzle", "puzzle"), ("SL + inpaint", "inpaint")):
            with tempfile.TemporaryDirectory() as out:
                argv = ["--dataset", "demo", "--ssl", ssl, "--arch", arch, "--out", out,
                        "--epochs", "1", "--no-eval", "--log-interval", "10",
                        "--device", str(device), "--workers", str(min(8, os.cpu_count() or 1))]
                if on_gpu:
                    argv += ["--image-size", "224", "--batch-size", str(args.batch), "--prepare",
                             "--max-steps", str(args.steps * 10)]
                start = time.perf_counter()
                train.main(argv)
                wall = time.perf_counter() - start
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    logged = [json.loads(line) for line in f]
                intervals = [e["images_per_s"] for e in logged if e["kind"] == "train"][1:]
                rates[name] = statistics.median(intervals) if intervals else 0.0
                rows.append(dict(part="e2e", arch=arch, model=name, images_per_s=rates[name],
                                 wall_s=wall, affectnet_epoch_min=287_651 / max(rates[name], 1e-9) / 60,
                                 peak_mib=None))
        for row in rows[-3:]:
            ratio = row["images_per_s"] / max(rates["SL"], 1e-9)
            row.update(ratio_vs_sl=ratio, ratio_vs_sl_min=ratio, ratio_vs_sl_max=ratio)
    return rows


def cpu_trainer(variant, batch, size, channels_last=True, dtype=None, compiled=False):
    """train.py's Trainer for the FER2013 20 % recipe of `variant` (sl, puzzle, inpaint) at
    `size` px, built as train.build_model builds it (seed 0), without a data set."""
    import data
    import hmtl
    import ssl_tasks
    import tasks
    import train
    config = {**train.recipe(f"fer2013-20pct-{variant}"), "image_size": size, "batch_size": batch}
    torch.manual_seed(0)
    layout = ssl_tasks.five_point_layout(data.FER2013_FIVE_POINTS)
    model = hmtl.build(config, data.FER2013_CLASSES, region_layout=layout)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory).train()
    if compiled:
        model.encoder.features.compile()  # what train.py --compile does
    optimizer = train.make_optimizer(model, config, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_cosine(90, 1800))
    return train.Trainer(model, train.JointLoss(model), optimizer, scheduler, None, dtype,
                         config["augment"], torch.Generator().manual_seed(0), memory,
                         torch.device("cpu"), tasks.TASKS[config["task"]])


def face_batch(batch, size, classes=7):
    """A batch as the prepared cache delivers it: uint8 faces, no landmarks (FER2013's)."""
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
            "landmarks": torch.zeros(batch, 68, 2), "has_landmarks": torch.zeros(batch, dtype=torch.bool),
            "target": torch.randint(0, classes, (batch,), generator=generator)}


def cpu_step(trainer, batch):
    import train
    sums = train.IntervalSums(trainer.device)
    return lambda: train.train_step(trainer, batch, sums)


def bench_cpu(args, device, autocast):
    """The FER2013 recipes' training step on the CPU, as train.py runs it (train.train_step:
    weak augmentation of the uint8 batch, the joint loss, backward, fused AdamW), SL and
    in-painting, 64 px, batch 64 unless --size/--batch say otherwise: today's default (float32,
    channels_last, eager) against each setting that could make it faster, interleaved in one
    process at this process's thread count; then the batch size, in faces per second."""
    if device.type != "cpu":
        import data
        raise data.UserError("bench.py cpu measures the CPU step: run it without --device cuda")
    size, batch = args.size, args.batch
    contenders = {"default (float32, channels_last, eager)": {},
                  "contiguous (NCHW)": dict(channels_last=False),
                  "bf16 autocast": dict(dtype=torch.bfloat16)}
    if args.compile:  # minutes of C++ compilation per model on 2 cores
        contenders.update({"torch.compile (inductor)": dict(compiled=True),
                           "torch.compile + bf16": dict(compiled=True, dtype=torch.bfloat16)})
    rows = []
    for variant in args.variants:
        faces = face_batch(batch, size)
        steps = {name: cpu_step(cpu_trainer(variant, batch, size, **settings), faces)
                 for name, settings in contenders.items()}
        compile_s = {}
        for name, step in steps.items():  # the first step: compilation, warm-up
            began = time.perf_counter()
            step()
            compile_s[name] = time.perf_counter() - began
        times = race(steps, device, args.steps, args.rounds)
        default = next(iter(contenders))
        for name in contenders:
            rows.append(dict(part="cpu", arch=variant, model=name,
                             images_per_s=batch / statistics.median(times[name]),
                             first_step_s=compile_s[name],
                             **paired_ratio(times[default], times[name], "vs_default"), peak_mib=None))
    for variant in args.variants:  # the batch size: faces per second at the default settings
        steps = {b: cpu_step(cpu_trainer(variant, b, size), face_batch(b, size)) for b in args.batches}
        times = race(steps, device, args.steps, args.rounds)
        per_face = {b: [t / b for t in times[b]] for b in args.batches}  # seconds per face
        for b in args.batches:
            rows.append(dict(part="cpu", arch=variant, model=f"batch {b}",
                             images_per_s=1 / statistics.median(per_face[b]),
                             **paired_ratio(per_face[batch], per_face[b], "vs_default"), peak_mib=None))
    return rows


def steady_rate(variant, batch, size, threads, steps):
    """Faces per second of `steps` default steps after two warm-up steps, on `threads`
    threads (run in a process of its own by bench_cpu_jobs); printed as one JSON line."""
    torch.set_num_threads(threads)
    step = cpu_step(cpu_trainer(variant, batch, size), face_batch(batch, size))
    step(), step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"images_per_s": batch * steps / (time.perf_counter() - began)}), flush=True)


def bench_cpu_jobs(args, device, autocast):
    """Ways to use the machine's cores for several runs: one run at a time on all threads; one
    run per core at once on one thread each (what train.py --compare --jobs N gives each job);
    one run per core at once on all threads each (oversubscribed: torch's default in every
    process). Each round starts fresh processes of each kind in turn; the rate is all the faces
    the processes train per second."""
    import subprocess
    cores = os.cpu_count() or 1
    here = os.path.dirname(os.path.abspath(__file__))

    def rate(jobs, threads, variant):
        code = (f"import bench; bench.steady_rate({variant!r}, {args.batch}, {args.size}, {threads}, "
                f"{args.steps})")
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # what train.run_processes sets
        processes = [subprocess.Popen([sys.executable, "-c", code], cwd=here, env=environment,
                                      stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
        return sum(json.loads(p.communicate()[0].splitlines()[-1])["images_per_s"] for p in processes)

    rows = []
    for variant in args.variants:
        kinds = {f"1 run x {cores} threads": (1, cores), f"{cores} runs x 1 thread": (cores, 1),
                 f"{cores} runs x {cores} threads (oversubscribed)": (cores, cores)}
        rates = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, (jobs, threads) in kinds.items():
                rates[name].append(rate(jobs, threads, variant))
        first = next(iter(kinds))
        for name in kinds:
            rows.append(dict(part="cpu-jobs", arch=variant, model=name,
                             images_per_s=statistics.median(rates[name]),  # rates: 1 / times
                             **paired_ratio(rates[name], rates[first], "vs_default"), peak_mib=None))
    return rows


def profile_cpu_step(args, variant="sl", top=15):
    """torch.profiler over 3 default steps: the operators that take the CPU's time."""
    from torch.profiler import ProfilerActivity, profile
    step = cpu_step(cpu_trainer(variant, args.batch, args.size), face_batch(args.batch, args.size))
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            step()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def smoke():
    """python bench.py smoke, on a CUDA machine: what CI (no GPU) cannot check, in a few
    minutes. First the tests that need CUDA (test_hmtl.py -k gpu_: bf16 and fp16 steps, a
    training step with no host synchronisation under torch.cuda.set_sync_debug_mode("error"),
    --compile without recompiles, a CPU checkpoint resumed on the GPU, the benchmarks running),
    then the figures to record in BENCHMARKS.md: B0 at 224 px, bf16, channels_last, batch 128,
    the training step of the hand-written model against torchvision's, and SL against each
    pretext task."""
    import subprocess
    import sys
    if not torch.cuda.is_available():
        import data
        raise data.UserError("bench.py smoke needs a CUDA GPU")
    here = os.path.dirname(os.path.abspath(__file__))
    tests = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "test_hmtl.py", "-k", "gpu_"],
                            cwd=here)
    print(f"\nGPU tests: {'passed' if tests == 0 else 'FAILED'}\n", flush=True)
    rows = main(["models", "hmtl", "predict", "--arch", "b0", "--size", "224", "--batch", "128",
                 "--rounds", "5", "--steps", "5"])
    return tests, rows


# ----------------------------------------------------------------------------------------------
# FER2013: the recipes chosen on PublicTest, then the paper's comparison, in one command that
# keeps a GPU busy with several runs at once (train.run_processes). Every run is train.py itself,
# into its own folder; a rerun reuses finished runs and resumes stopped ones. The SL settings
# are chosen one factor at a time around a base, each factor at its best level on PublicTest
# (best validation accuracy of the run); then lambda and the view, with one grid for both
# pretext tasks. The comparison's cells are written where `train.py --compare` looks for them.

FER2013_BASE = dict(image_size=48, batch_size=64, lr=1e-3, warmup_epochs=1, augment="weak",
                    imbalance="none", dropout=0.2, stochastic_depth=0.2)
FER2013_SL_GRID = [("image_size", 64), ("augment", "none"), ("augment", "strong"), ("lr", 3e-3),
                   ("lr", 3e-4), ("imbalance", "weights"), ("dropout", 0.0)]
FER2013_SSL_GRID = [dict(lambda_ssl=lam, view=view) for lam in (0.3, 1.0) for view in ("shared", "separate")]


def fer2013_settings(settings):
    """The settings a run trains with: dropout 0 switches stochastic depth off with it."""
    return {**settings, **({"stochastic_depth": 0.0} if settings.get("dropout") == 0.0 else {})}


def fer2013_flags(root, settings, epochs, fraction, ssl, seed, folder, cache_dir=None, workers=2):
    """train.py's command line for one run: every chosen setting spelled out."""
    settings = fer2013_settings(settings)
    flags = ["--dataset", "fer2013", "--data-root", root, "--epochs", str(epochs), "--ssl", ssl,
             "--train-fraction", str(fraction), "--seed", str(seed), "--out", folder, "--workers", str(workers)]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags + (["--cache-dir", cache_dir] if cache_dir else [])


def best_validation(folder):
    """The best validation accuracy of a finished run (what best.pt is selected by), or None."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        scores = [json.loads(line)["accuracy"] for line in f if '"kind": "val"' in line]
    return max(scores) if scores else None


def fer2013_arguments(argv):
    parser = argparse.ArgumentParser(description="FER2013: choose the recipes on PublicTest, then "
                                                 "run the comparison (SL, puzzle, in-painting)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="runs/fer2013-bench")
    parser.add_argument("--cache-dir")
    parser.add_argument("--jobs", type=int, default=6, help="runs at once")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes per run")
    parser.add_argument("--minutes", type=float, help="stop starting runs, and stop running ones, "
                                                      "after this long (they resume on a rerun)")
    parser.add_argument("--epochs-20pct", type=int, default=20)
    parser.add_argument("--epochs-full", type=int, default=15)
    parser.add_argument("--full-seeds", type=int, default=3)
    parser.add_argument("--phases", nargs="+", default=["sl", "ssl", "compare"],
                        choices=["sl", "ssl", "compare"],
                        help="stop after the SL grid (sl), the pretext grid (ssl) or the comparison; "
                             "a later phase reads the finished runs of the earlier ones")
    return parser.parse_args(argv)


def fer2013(argv=None):
    """The three phases, each reading the finished runs of the one before: the SL grid, the
    pretext grid, the comparison."""
    import data
    args = fer2013_arguments(argv)
    last_phase = ["sl", "ssl", "compare"].index(args.phases[-1])
    args.deadline = time.time() + args.minutes * 60 if args.minutes else None
    args.faces = data.load("fer2013", args.data_root, cache_root=args.cache_dir)
    os.makedirs(args.out, exist_ok=True)
    summary = fer2013_sl_grid(args)
    if last_phase >= 1:
        summary.update(fer2013_ssl_grid(args, summary["chosen"]))
    if last_phase >= 2:
        summary = fer2013_comparison(args, summary)
    return summary


def fer2013_train(args, named):
    """Train the runs {name: train.py flags} not finished yet, `args.jobs` at a time, each its
    own train.py process (until the deadline); {name: its folder}."""
    import data
    import train
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")]
    jobs = [(command + flags, flags[flags.index("--out") + 1]) for flags in named.values()]
    jobs = [job for job in jobs if train.final_test(job[1]) is None]
    if args.deadline is not None and time.time() >= args.deadline:
        jobs = []
    for size in sorted({int(command[command.index("--image-size") + 1]) for command, _ in jobs}):
        began = time.perf_counter()  # once, before the runs that would each build it
        data.prepare(args.faces, args.data_root, size, progress=lambda line: None)
        print(f"the {size} px cache: {time.perf_counter() - began:.1f} s", flush=True)
    began = time.perf_counter()
    train.run_processes(jobs, args.jobs, args.deadline)
    print(f"{len(jobs)} runs in {time.perf_counter() - began:.0f} s", flush=True)
    return {name: flags[flags.index("--out") + 1] for name, flags in named.items()}


def fer2013_sl_runs():
    return {"base": FER2013_BASE, **{f"{k}={v}": {**FER2013_BASE, k: v} for k, v in FER2013_SL_GRID}}


def fer2013_sl_grid(args):
    """SL at 20 %, one factor at a time around the base; each factor at its best level on
    PublicTest, the base's if none beats it."""
    grid = os.path.join(args.out, "grid")
    folders = fer2013_train(args, {
        name: fer2013_flags(args.data_root, s, args.epochs_20pct, 0.2, "none", 0,
                            os.path.join(grid, f"sl-{name}"), args.cache_dir, args.workers)
        for name, s in fer2013_sl_runs().items()})
    scores = {name: best_validation(folder) for name, folder in folders.items()}
    chosen = dict(FER2013_BASE)
    for key in dict(FER2013_SL_GRID):
        levels = [("base", FER2013_BASE[key])] + [(f"{k}={v}", v) for k, v in FER2013_SL_GRID if k == key]
        best = max(levels, key=lambda level: scores[level[0]] if scores[level[0]] is not None else -1)
        chosen[key] = best[1]
    print(json.dumps({"sl_grid": scores, "chosen": chosen}), flush=True)
    return {"sl_grid": scores, "chosen": chosen}


def fer2013_ssl_grid(args, chosen):
    """λ × view for both pretext tasks on the chosen SL settings; each task's best on PublicTest."""
    grid = os.path.join(args.out, "grid")
    ssl_names = {f"{ssl}-lambda{g['lambda_ssl']}-{g['view']}": (ssl, g)
                 for ssl in ("puzzle", "inpaint") for g in FER2013_SSL_GRID}
    folders = fer2013_train(args, {
        name: fer2013_flags(args.data_root, {**chosen, **g}, args.epochs_20pct, 0.2, ssl, 0,
                            os.path.join(grid, name), args.cache_dir, args.workers)
        for name, (ssl, g) in ssl_names.items()})
    ssl_scores = {name: best_validation(folder) for name, folder in folders.items()}
    pretext = {}
    for ssl in ("puzzle", "inpaint"):
        mine = {name: s for name, s in ssl_scores.items() if name.startswith(ssl) and s is not None}
        pretext[ssl] = ssl_names[max(mine, key=mine.get)][1] if mine else FER2013_SSL_GRID[0]
    print(json.dumps({"ssl_grid": ssl_scores, "pretext": pretext}), flush=True)
    return {"ssl_grid": ssl_scores, "pretext": pretext}


def fer2013_comparison(args, chosen_so_far):
    """The comparison's cells (20 % over train.COMPARE_SEEDS, full over --full-seeds), with the
    chosen settings, where `train.py --compare` looks for them; fer2013.json."""
    import train
    chosen, pretext = chosen_so_far["chosen"], chosen_so_far["pretext"]
    grid, compare = os.path.join(args.out, "grid"), os.path.join(args.out, "compare")
    # the grid's seed-0 runs at 20 % of the chosen settings are those cells already: copied, not
    # trained again (train.py --compare accepts a run by its settings)
    grid_runs = {"none": next((os.path.join(grid, f"sl-{name}") for name, s in fer2013_sl_runs().items()
                               if fer2013_settings(s) == fer2013_settings(chosen)), None),
                 **{ssl: os.path.join(grid, f"{ssl}-lambda{g['lambda_ssl']}-{g['view']}") for ssl, g in pretext.items()}}
    for ssl, source in grid_runs.items():
        cell = os.path.join(compare, train.run_name(ssl, 0.2, 0))
        if source and train.final_test(source) is not None and not os.path.exists(cell):
            shutil.copytree(source, cell)
    cells = {}
    for fraction, epochs, seeds in ((0.2, args.epochs_20pct, train.COMPARE_SEEDS),
                                    (1.0, args.epochs_full, train.COMPARE_SEEDS[:1]),
                                    (1.0, args.epochs_full, train.COMPARE_SEEDS[1:args.full_seeds])):
        for seed in seeds:
            for ssl in train.COMPARE_DEFAULT:
                folder = os.path.join(compare, train.run_name(ssl, fraction, seed))
                cells[folder] = fer2013_flags(args.data_root, {**chosen, **pretext.get(ssl, {})},
                                              epochs, fraction, ssl, seed, folder, args.cache_dir,
                                              args.workers)
    fer2013_train(args, cells)
    results = {os.path.basename(folder): train.final_test(folder) for folder in cells}
    summary = {"torch": torch.__version__, "device": describe_device(), **chosen_so_far,
               "epochs": {"20pct": args.epochs_20pct, "full": args.epochs_full},
               "test": {name: r and {"accuracy": r["accuracy"], "macro_f1": r.get("macro_f1")}
                        for name, r in results.items()}}
    with open(os.path.join(args.out, "fer2013.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def describe_device():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(device, args):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                device=f"{device.type}: {name}",
                threads=torch.get_num_threads(), size=args.size, data_size=args.data_size,
                batch=args.batch,
                steps=args.steps, rounds=args.rounds, amp=args.amp,
                channels_last=args.channels_last, compile=args.compile)


def print_table(rows, baseline):
    """One table per part: images/s, speed relative to the part's baseline, memory."""
    key = f"ratio_vs_{baseline}"
    print(f"{'arch':4}  {'model':36} {'img/s':>9} {'vs ' + baseline + ' (range)':>24} "
          f"{'act MiB':>9} {'peak MiB':>9}")
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        act = f"{r['activation_mib']:.1f}" if "activation_mib" in r else "-"
        ratio = f"{r[key]:.3f}"
        if r[key + "_min"] != r[key + "_max"]:
            ratio += f" ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})"
        print(f"{r['arch']:4}  {r['model']:36} {r['images_per_s']:9.1f} {ratio:>24} "
              f"{act:>9} {peak:>9}")
        if "affectnet_epoch_min" in r:
            print(f"      (loop {r['wall_s']:.0f} s wall; one AffectNet-8 epoch at this rate: "
                  f"{r['affectnet_epoch_min']:.1f} min)")
        if "seconds" in r:
            print(f"      ({r['seconds']:.2f} s in all)")
        if "first_step_s" in r:
            print(f"      (first step {r['first_step_s']:.1f} s: compilation and warm-up)")
        if "share_of_step" in r:
            print(f"      (strong augmentation takes {100 * r['share_of_step']:.1f} % of a "
                  f"training step's time)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["models", "hmtl", "data", "predict"],
                        choices=list(PARTS) + ["smoke"],
                        help="which benchmarks (default: models hmtl data predict); smoke: the "
                             "GPU check (CUDA tests, then the GPU figures)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", nargs="+", default=["b0", "b2"], choices=sorted(models.VARIANTS))
    parser.add_argument("--size", type=int, help="image side in pixels (CPU 112, CUDA 224)")
    parser.add_argument("--batch", type=int, help="batch size (CPU 16, CUDA 128)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; median reported")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--data-size", type=int, default=224, help="data part: face crop side")
    parser.add_argument("--data-images", type=int, default=256, help="data part: JPEGs written")
    parser.add_argument("--fingerprint-images", type=int, default=287651,
                        help="fingerprint part: files written (AffectNet's training rows)")
    parser.add_argument("--reader-rows", type=int, default=142333,
                        help="reader part: training rows written (s-Aff-Wild2's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off for CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last memory format (default: on for CUDA, off for CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=["sl", "inpaint"],
                        choices=["sl", "puzzle", "inpaint"], help="cpu parts: the FER2013 recipes timed")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256],
                        help="cpu part: the batch sizes compared")
    parser.add_argument("--profile", action="store_true",
                        help="cpu part: also print torch.profiler's operator table of the default step")
    if (argv if argv is not None else sys.argv[1:])[:1] == ["fer2013"]:
        return fer2013((argv if argv is not None else sys.argv[1:])[1:])
    args = parser.parse_args(argv)
    if args.parts == ["smoke"]:
        return smoke()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    cpu_parts = {"cpu", "cpu-jobs"} & set(args.parts)  # FER2013's recipe: 64 px, batch 64
    args.size = args.size or (224 if on_gpu else 64 if cpu_parts else 112)
    args.batch = args.batch or (128 if on_gpu else 64 if cpu_parts else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.amp = on_gpu if args.amp is None else args.amp
    args.channels_last = on_gpu if args.channels_last is None else args.channels_last

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    setting = describe(device, args)
    if cpu_parts == set(args.parts):  # their rows name their own precision and layout
        setting = {k: v for k, v in setting.items() if k not in ("amp", "channels_last", "data_size")}
    if not args.json:
        print(" ".join(f"{k}={v}" for k, v in setting.items()))
    rows = []
    for part in args.parts:
        run, baseline = PARTS[part]
        part_rows = run(args, device, autocast)
        rows += part_rows
        if not args.json:
            print(f"\n[{part}]")
            print_table(part_rows, baseline)
    if args.profile:
        for variant in args.variants:
            print(f"\n[profile: {variant}, the default step]\n{profile_cpu_step(args, variant)}")
    if args.json:
        print(json.dumps(dict(setting=setting, rows=rows), indent=1))
    return rows


# part name -> (function, the contender the ratios are relative to)
PARTS = {"models": (bench_models, "torchvision"), "hmtl": (bench_hmtl, "sl"),
         "cpu": (bench_cpu, "default"), "cpu-jobs": (bench_cpu_jobs, "default"),
         "data": (bench_data, "step"), "e2e": (bench_e2e, "sl"),
         "fingerprint": (bench_fingerprint, "exists"), "reader": (bench_reader, "parse"),
         "predict": (bench_predict, "forward")}


if __name__ == "__main__":
    import data
    try:
        main()
    except data.UserError as err:  # what was asked cannot be done: one line, no traceback
        sys.exit(f"error: {err}")
