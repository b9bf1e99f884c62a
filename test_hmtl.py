"""Tests for HMTL. Known answers, on the CPU, in minutes: `python -m pytest -q test_hmtl.py`.

torchvision is imported here (and in bench.py) only as the reference the hand-written
EfficientNet is proven against.
"""

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import bench
import hmtl
import models
import ssl_tasks

ARCHS = ["b0", "b2"]
HERE = Path(__file__).parent


def torchvision_efficientnet(arch, **kwargs):
    return getattr(torchvision.models, f"efficientnet_{arch}")(**kwargs)


def randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so eval-mode parity tests more than
    the identity BN of a fresh model."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# models.py: the hand-written EfficientNet against torchvision's.

@pytest.mark.parametrize("arch,classes,expected", [
    ("b0", 1000, 5_288_548), ("b2", 1000, 9_109_994), ("b0", 8, 4_017_796), ("b2", 8, 7_712_266)])
def test_parameter_counts_match_the_reference(arch, classes, expected):
    model = models.efficientnet(arch, classes)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_scaling_rules():
    assert models.scale_width(32, 1.1) == 32      # 35.2 rounds down to 32 (within 10 %)
    assert models.scale_width(320, 1.1) == 352
    assert models.scale_width(1280, 1.1) == 1408
    assert models.scale_width(10, 1.0) == 16      # 8 would be > 10 % below 10: bumped up
    assert models.scale_width(3, 1.0) == 8        # never below the divisor
    assert models.scale_depth(3, 1.2) == 4        # 3.6 rounds up
    assert models.scale_depth(1, 1.2) == 2
    assert models.scale_depth(4, 1.0) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_has_torchvision_keys_and_shapes(arch):
    ours, reference = models.efficientnet(arch, 8), torchvision_efficientnet(arch, num_classes=8)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in reference.state_dict().items()]
    ours.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [224, 64])
def test_eval_logits_equal_torchvision(arch, size):
    torch.manual_seed(0)
    reference = randomize_batchnorm(torchvision_efficientnet(arch)).eval()
    ours = models.efficientnet(arch).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference(images)
        torch.testing.assert_close(ours(images), expected, rtol=0, atol=1e-5)
        assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_training_step_equals_torchvision(arch, memory_efficient):
    """Train mode, stochastic depth and dropout off (they draw random numbers differently):
    same loss, same gradients, same BN running statistics after the step."""
    torch.manual_seed(0)
    reference = torchvision_efficientnet(arch, stochastic_depth_prob=0.0, dropout=0.0).train()
    ours = models.efficientnet(arch, stochastic_depth=0.0, dropout=0.0,
                               memory_efficient=memory_efficient).train()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(4, 3, 64, 64)
    loss_ours, loss_ref = ours(images).square().mean(), reference(images).square().mean()
    loss_ours.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=0)
    scale = max(p.grad.abs().max() for p in reference.parameters())
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-4 * scale, msg=name)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_memory_efficient_activation_keeps_less_and_matches_in_bf16():
    torch.manual_seed(0)
    plain = models.efficientnet_b0(8, stochastic_depth=0.0, dropout=0.0).train()
    lean = models.efficientnet_b0(8, stochastic_depth=0.0, dropout=0.0, memory_efficient=True)
    lean.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def float32():
        return torch.autocast("cpu", enabled=False)
    # One tensor fewer is kept per conv-BN-SiLU: the BN output, the size of its output (up to
    # the small per-channel statistics, which the two paths keep in different tensors).
    bn_outputs = []
    hooks = [m.register_forward_hook(lambda m, i, out: bn_outputs.append(out.numel() * 4))
             for m in plain.modules() if isinstance(m, models.ConvBNAct) and m.activation]
    saved_plain = bench.activation_mib(plain, images, float32)
    for hook in hooks:
        hook.remove()
    saved_lean = bench.activation_mib(lean, images, float32)
    assert saved_plain - saved_lean == pytest.approx(sum(bn_outputs) / 2**20, rel=0.02)
    assert saved_lean < 0.85 * saved_plain
    for model in (plain, lean):
        with bf16():
            out = model(images)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
    for p, q in zip(lean.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_stochastic_depth_drops_or_rescales_each_sample():
    torch.manual_seed(0)
    block = models.MBConv(16, 16, expand=6, kernel=3, stride=1, drop_prob=0.5).eval()
    x = torch.randn(64, 16, 8, 8)
    with torch.no_grad():
        branch = block.block(x)
        assert torch.equal(block(x), branch + x)  # eval: deterministic, no rescaling
        block.train()
        block.block.eval()  # keep BN in eval so the branch is the same function of x
        out = block(x)
    dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, x + 2 * branch, atol=1e-5).flatten(1).all(1)
    assert torch.all(dropped ^ kept)          # each sample: exactly one of the two
    assert 16 < dropped.sum() < 48            # about half of 64 dropped
    probs = [b.drop_prob for stage in models.efficientnet_b0().features[1:-1] for b in stage]
    assert probs[0] == 0 and probs == sorted(probs) and probs[-1] == pytest.approx(0.2 * 15 / 16)


@pytest.mark.parametrize("arch,width", [("b0", 1280), ("b2", 1408)])
def test_features_and_pooled_embedding(arch, width):
    model = models.efficientnet(arch, 8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = model.forward_features(images)
        pooled = model.pool(feature_map)
        assert model.num_features == width
        assert feature_map.shape == (2, width, 2, 2)
        assert pooled.shape == (2, width)
        torch.testing.assert_close(model.classifier(pooled), model(images))


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_no_graph_breaks_under_torch_compile(memory_efficient):
    model = models.efficientnet_b0(8, memory_efficient=memory_efficient).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_imagenet_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorm(torchvision_efficientnet("b0"))
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    model = models.load_imagenet_weights(models.efficientnet_b0(num_classes=8), "b0", str(path))
    assert model.classifier[1].out_features == 8
    for (name, a), b in zip(model.features.state_dict().items(), reference.features.state_dict().values()):
        assert torch.equal(a, b), name
    # A 1000-way model keeps the ImageNet classifier too.
    full = models.load_imagenet_weights(models.efficientnet_b0(), "b0", str(path))
    assert torch.equal(full.classifier[1].weight, reference.classifier[1].weight)


def test_imagenet_weights_found_in_the_hub_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the file is in the cache")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cached = models.imagenet_weights_path("b2")
    assert cached == str(tmp_path / "checkpoints" / "efficientnet_b2_rwightman-c35c1473.pth")
    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision_efficientnet("b2").state_dict(), cached)
    model = models.load_imagenet_weights(models.efficientnet_b2(num_classes=3), "b2")
    assert model.classifier[1].out_features == 3


def test_imagenet_weights_without_network_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        models.load_imagenet_weights(models.efficientnet_b0(num_classes=8), "b0")
    message = str(err.value)
    assert "\n" not in message
    assert models.IMAGENET_WEIGHTS["b0"] in message and models.imagenet_weights_path("b0") in message


def test_imagenet_weights_of_the_wrong_model_are_refused(tmp_path):
    path = tmp_path / "b2.pth"
    torch.save(torchvision_efficientnet("b2").state_dict(), path)
    with pytest.raises(RuntimeError, match="is not an EfficientNet-B0 state_dict|size mismatch"):
        models.load_imagenet_weights(models.efficientnet_b0(num_classes=8), "b0", str(path))
    with pytest.raises(RuntimeError, match="does not exist"):
        models.load_imagenet_weights(models.efficientnet_b0(), "b0", str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------------
# ssl_tasks.py: puzzling.

def tiles_of(images, grid):
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    return [images[:, :, r * th:(r + 1) * th, col * tw:(col + 1) * tw]
            for r in range(grid) for col in range(grid)]


@pytest.mark.parametrize("grid,size", [(3, (63, 63)), (3, (64, 65)), (2, (32, 32))])
def test_puzzle_moves_tiles_and_unpuzzle_inverts_exactly(grid, size):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, *size)
    puzzled, order = ssl_tasks.puzzle(images, grid, generator)
    assert puzzled.shape == images.shape
    assert torch.equal(ssl_tasks.unpuzzle(puzzled, order, grid), images)
    assert torch.equal(order.sort(1).values, torch.arange(grid * grid).expand(5, -1))
    original, shuffled = tiles_of(images, grid), tiles_of(puzzled, grid)
    for b in range(5):
        for position in range(grid * grid):
            assert torch.equal(shuffled[position][b], original[order[b, position]][b])
    # leftover rows/columns (size not a multiple of the grid) stay in place
    h, w = size
    assert torch.equal(puzzled[:, :, h - h % grid:], images[:, :, h - h % grid:])
    assert torch.equal(puzzled[:, :, :, w - w % grid:], images[:, :, :, w - w % grid:])


def test_puzzle_permutations_are_uniform():
    """All 24 permutations of a 2x2 grid, 24,000 draws: chi-square with 23 degrees of freedom
    stays below 49.7 (p = 0.001) for a uniform draw. Seeded, so not flaky."""
    generator = torch.Generator().manual_seed(1)
    _, order = ssl_tasks.puzzle(torch.zeros(24_000, 1, 2, 2), 2, generator)
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].float()
    assert len(counts) == 24
    chi_square = ((counts - 1000) ** 2 / 1000).sum()
    assert chi_square < 49.7


def test_puzzle_keeps_channels_last_and_draws_differ_per_sample():
    images = torch.randn(8, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    puzzled, order = ssl_tasks.puzzle(images, 3, torch.Generator().manual_seed(0))
    assert puzzled.is_contiguous(memory_format=torch.channels_last)
    assert len({tuple(row.tolist()) for row in order}) == 8


def test_puzzle_head_and_loss():
    head = ssl_tasks.PuzzleHead(32, grid=3).eval()
    assert head(torch.randn(4, 32)).shape == (4, 9, 9)
    order = torch.stack([torch.randperm(9) for _ in range(4)])
    perfect = F.one_hot(order, 9).float() * 100
    assert ssl_tasks.puzzle_loss(perfect, order) < 1e-6
    uniform = torch.zeros(4, 9, 9)
    assert ssl_tasks.puzzle_loss(uniform, order).item() == pytest.approx(torch.log(torch.tensor(9.)).item())


# ----------------------------------------------------------------------------------------------
# ssl_tasks.py: region masking and in-painting.

def face_landmarks(batch=1):
    """68 landmarks (pixels of a 64x64 image) with each group on a known horizontal segment."""
    points = torch.zeros(68, 2)
    spans = {"right_brow": (10, 28, 16), "left_brow": (36, 54, 16), "right_eye": (12, 26, 24),
             "left_eye": (38, 52, 24), "nose": (28, 36, 34), "mouth": (20, 44, 50)}
    for region, (x0, x1, y) in spans.items():
        group = list(ssl_tasks.LANDMARK_GROUPS[region])
        points[group, 0] = torch.linspace(x0, x1, len(group))
        points[group, 1] = y
    points[:17] = torch.tensor([32.0, 60.0])  # the jaw is not a masked region
    return points.expand(batch, -1, -1)


def test_region_boxes_from_landmarks_and_canonical_positions():
    has = torch.tensor([True, False])
    boxes = ssl_tasks.region_boxes(2, 64, 64, face_landmarks(2), has, margin=0.25, jitter=0.0)
    mouth = ssl_tasks.REGIONS.index("mouth")
    # mouth group spans x 20..44 at y 50: grown by 25 % of its width (6 px) and >= 2 px in height
    assert boxes[0, mouth].tolist() == [14.0, 48.0, 50.0, 52.0]
    canonical = torch.tensor([ssl_tasks.CANONICAL_BOXES[r] for r in ssl_tasks.REGIONS]) * 64
    torch.testing.assert_close(boxes[1], canonical)
    all_have = ssl_tasks.region_boxes(2, 64, 64, face_landmarks(2), jitter=0.0)
    torch.testing.assert_close(all_have[1], boxes[0])
    jittered = ssl_tasks.region_boxes(256, 64, 64, jitter=0.05,
                                      generator=torch.Generator().manual_seed(0))
    slack = 0.05 * 64 + 0.05 * (canonical[:, 2:] - canonical[:, :2]).max()
    assert (jittered - canonical).abs().max() <= slack + 1e-4
    assert (jittered - canonical).abs().max() > 1.0           # it does move
    assert jittered.min() >= 0 and jittered.max() <= 64        # clipped to the image


def test_region_mask_covers_exactly_the_chosen_boxes():
    boxes = torch.tensor([[[0., 0., 4., 4.], [10., 10., 12., 16.], [20., 2., 30., 3.]]])
    everything = ssl_tasks.region_mask(boxes, 32, 32, regions_per_image=3)[0, 0]
    expected = torch.zeros(32, 32)
    expected[0:4, 0:4] = 1
    expected[10:16, 10:12] = 1
    expected[2:3, 20:30] = 1
    assert torch.equal(everything, expected)
    # with 1 region per image, every sample's mask is exactly one of the boxes
    areas = {16.0, 12.0, 10.0}
    masks = ssl_tasks.region_mask(boxes.expand(300, -1, -1), 32, 32, 1,
                                  torch.Generator().manual_seed(0))
    per_sample = masks.sum((1, 2, 3))
    assert set(per_sample.tolist()) == areas
    assert (masks <= expected).all()


def test_masks_stay_inside_the_landmark_regions():
    generator = torch.Generator().manual_seed(0)
    landmarks, has = face_landmarks(16), torch.ones(16, dtype=torch.bool)
    boxes = ssl_tasks.region_boxes(16, 64, 64, landmarks, has, generator=generator)
    mask = ssl_tasks.region_mask(boxes, 64, 64, 2, generator)
    union = ssl_tasks.region_mask(boxes, 64, 64, len(ssl_tasks.REGIONS))
    assert (mask <= union).all() and mask.sum() > 0
    assert mask[:, :, 56:].sum() == 0 and mask[:, :, :8].sum() == 0  # nothing on the jaw or hair


def test_mask_images_fills_only_masked_pixels():
    images = torch.randn(2, 3, 8, 8) + 5
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:4, 2:6] = 1
    zero = ssl_tasks.mask_images(images, mask, "zero")
    assert torch.equal(zero[:, :, 2:4, 2:6], torch.zeros(2, 3, 2, 4))
    assert torch.equal(zero * (1 - mask), images * (1 - mask))
    mean = ssl_tasks.mask_images(images, mask, "mean")
    torch.testing.assert_close(mean[:, :, 3, 3], images.mean((2, 3)))
    with pytest.raises(ValueError, match="unknown fill"):
        ssl_tasks.mask_images(images, mask, "blur")


@pytest.mark.parametrize("perceptual", ["backbone", "none"])
def test_inpaint_loss_is_zero_only_for_a_perfect_reconstruction(perceptual):
    torch.manual_seed(0)
    model = hmtl.HMTL("b0", ssl="inpaint", perceptual=perceptual)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 20:40, 16:48] = 1
    net = model.perceptual_net()
    outside_wrong = images + (1 - mask) * torch.randn_like(images)  # perfect inside the mask
    total, l1, perc = ssl_tasks.inpaint_loss(outside_wrong, images, mask, net)
    assert total.item() == 0 and l1.item() == 0 and perc.item() == 0
    inside_wrong = images + mask * 0.5
    total, l1, perc = ssl_tasks.inpaint_loss(inside_wrong, images, mask, net)
    assert l1.item() == pytest.approx(0.5)
    assert (perc.item() > 0) == (perceptual == "backbone") and total > l1 - 1e-6


def test_decoder_restores_the_input_size():
    decoder = ssl_tasks.InpaintDecoder(1280)
    assert decoder(torch.randn(2, 1280, 2, 2), (64, 64)).shape == (2, 3, 64, 64)
    assert decoder(torch.randn(2, 1280, 3, 3), (70, 90)).shape == (2, 3, 70, 90)


def test_perceptual_features_never_train_the_network():
    model = hmtl.HMTL("b0", ssl="inpaint").train()
    early = model.encoder.features[:hmtl.PERCEPTUAL_STAGES]
    stats = [b.clone() for b in early.buffers()]
    reconstruction = torch.randn(2, 3, 64, 64, requires_grad=True)
    mask = torch.ones(2, 1, 64, 64)
    _, _, perceptual = ssl_tasks.inpaint_loss(reconstruction, torch.randn(2, 3, 64, 64), mask,
                                              model.perceptual_net())
    perceptual.backward()
    assert reconstruction.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, early.buffers()))  # BN stats untouched
    assert all(m.training for m in model.modules())                        # modes restored


def test_vgg16_perceptual_net_loads_a_local_file_and_fails_in_one_line(tmp_path, monkeypatch):
    features = torchvision.models.vgg16().features[:ssl_tasks.VGG16_LAYERS]
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    net = ssl_tasks.vgg16_perceptual_net(str(path))
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    torch.testing.assert_close(net[0].weight, features[0].weight)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        ssl_tasks.vgg16_perceptual_net()
    assert "\n" not in str(err.value) and "vgg16-397923af.pth" in str(err.value)


# ----------------------------------------------------------------------------------------------
# hmtl.py: task losses.

def test_ccc_and_the_va_loss():
    target = torch.tensor([[0.5, -0.2], [-0.3, 0.4], [0.9, 0.1], [-0.8, -0.6]])
    assert hmtl.va_loss(target.clone(), target).item() == pytest.approx(0, abs=1e-6)
    shifted = target[:, 0] + 0.5          # CCC = 2 var / (2 var + shift^2)
    var = target[:, 0].var(unbiased=False)
    assert hmtl.ccc(shifted, target[:, 0]).item() == pytest.approx((2 * var / (2 * var + 0.25)).item(), rel=1e-5)
    centred = target[:, 0] - target[:, 0].mean()   # mirrored around a zero mean: CCC = -1
    assert hmtl.ccc(-centred, centred).item() == pytest.approx(-1, abs=1e-5)
    pred = torch.randn(4, 2)
    with_sentinels = torch.cat([target, torch.tensor([[-2.0, -2.0], [0.3, -5.0]])])
    pred_extra = torch.cat([pred, torch.tensor([[9.0, 9.0], [0.1, 7.0]])])
    # the (0.3, -5) row counts for valence only
    expected = (1 - hmtl.ccc(torch.cat([pred[:, 0], torch.tensor([0.1])]),
                             torch.cat([target[:, 0], torch.tensor([0.3])]))) + \
               (1 - hmtl.ccc(pred[:, 1], target[:, 1]))
    torch.testing.assert_close(hmtl.va_loss(pred_extra, with_sentinels), expected)
    assert hmtl.va_loss(pred, torch.full((4, 2), -2.0)).item() == 0


def test_pose_bins_and_expectation():
    angles = torch.tensor([-99.0, -97.0, -96.0, 0.0, 1.5, 98.9])
    assert hmtl.pose_to_bins(angles).tolist() == [0, 0, 1, 33, 33, 65]
    centres = hmtl.pose_bin_centres()
    assert centres[0] == -97.5 and centres[33] == 1.5 and centres[-1] == 97.5
    one_hot = F.one_hot(torch.tensor([[0, 33, 65]]), 66).float() * 1000
    assert hmtl.pose_expectation(one_hot).tolist() == [[-97.5, 1.5, 97.5]]
    loss = hmtl.pose_loss(one_hot.flatten(1), torch.tensor([[-97.5, 1.5, 97.5]]))
    assert loss.item() == pytest.approx(0, abs=1e-4)


def test_class_weights_follow_the_official_rule():
    assert hmtl.class_weights([10, 5, 20, 0]).tolist() == [2.0, 4.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# hmtl.py: the HMTL model.

@pytest.mark.parametrize("ssl", ["puzzle", "inpaint"])
@pytest.mark.parametrize("view", ["shared", "separate"])
def test_pretext_gradients_reach_the_encoder(ssl, view):
    torch.manual_seed(0)
    model = hmtl.HMTL("b0", "classify", 8, ssl, view=view, task_weight=0.0).train()
    parts, outputs = model.losses(torch.randn(4, 3, 64, 64),
                                  generator=torch.Generator().manual_seed(0))
    assert outputs is None and set(parts) >= {"loss", "ssl"} and "task" not in parts
    parts["loss"].backward()
    for name in ("features.0.0.weight", "features.5.0.block.1.0.weight", "features.8.0.weight"):
        assert model.encoder.get_parameter(name).grad.abs().sum() > 0, name
    assert model.encoder.classifier[1].weight.grad is None  # the task head took no part


@pytest.mark.parametrize("task,targets", [
    ("classify", torch.tensor([0, 3, 7, 1])),
    ("va", torch.tensor([[0.1, 0.2], [-0.5, 0.3], [-2.0, -2.0], [0.7, -0.9]])),
    ("pose", torch.tensor([[10.0, -5.0, 2.0], [-60.0, 20.0, 0.0], [0.0, 0.0, 0.0], [90.0, -80.0, 30.0]]))])
@pytest.mark.parametrize("ssl", ["none", "puzzle", "inpaint"])
def test_joint_loss_is_task_plus_lambda_ssl(task, targets, ssl):
    torch.manual_seed(0)
    model = hmtl.HMTL("b0", task, 8, ssl, lambda_ssl=0.3).train()
    parts, outputs = model.losses(torch.randn(4, 3, 64, 64), targets,
                                  generator=torch.Generator().manual_seed(0))
    assert outputs.shape == (4, hmtl.task_outputs(task, 8))
    expected = parts["task"] + 0.3 * parts.get("ssl", 0)
    torch.testing.assert_close(parts["loss"].detach(), expected)
    if ssl == "inpaint":
        torch.testing.assert_close(parts["ssl"], parts["l1"] + parts["perceptual"])
    parts["loss"].backward()
    assert model.encoder.classifier[1].weight.grad.abs().sum() > 0


def test_shared_view_feeds_the_task_head_the_transformed_image():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    for view, sees_clean in (("shared", False), ("separate", True)):
        model = hmtl.HMTL("b0", "classify", 8, "puzzle", view=view).eval()  # BN: no batch mixing
        with torch.no_grad():
            _, outputs = model.losses(images, labels, generator=torch.Generator().manual_seed(0))
            puzzled, _ = ssl_tasks.puzzle(images, 3, torch.Generator().manual_seed(0))
            clean, transformed = model(images), model(puzzled)
        torch.testing.assert_close(outputs, clean if sees_clean else transformed)


@pytest.mark.parametrize("ssl", ["puzzle", "inpaint"])
def test_export_drops_the_pretext_heads_and_keeps_the_task_outputs(ssl):
    torch.manual_seed(0)
    model = hmtl.HMTL("b0", "classify", 8, ssl).train()
    for _ in range(2):  # move BN statistics and weights away from their initial values
        parts, _ = model.losses(torch.randn(4, 3, 64, 64), torch.randint(0, 8, (4,)))
        parts["loss"].backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
    deployed = hmtl.export(model)
    keys = set(deployed.state_dict())
    assert not any(k.startswith(("puzzle_head", "decoder", "vgg")) for k in keys)
    assert any(k.startswith(("puzzle_head", "decoder")) for k in model.state_dict())
    assert sum(p.numel() for p in deployed.parameters()) == 4_017_796  # a plain B0, 8 classes
    torchvision_efficientnet("b0", num_classes=8).load_state_dict(deployed.state_dict())
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), model(images), rtol=0, atol=0)


def test_hmtl_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown ssl"):
        hmtl.HMTL(ssl="rotation")
    with pytest.raises(ValueError, match="unknown task"):
        hmtl.HMTL(task="age")
    with pytest.raises(ValueError, match="pretext-only"):
        hmtl.HMTL(ssl="none", task_weight=0.0)


def test_recipes_cover_every_experiment_and_set_only_known_settings():
    for name in hmtl.RECIPES:
        config = hmtl.recipe(name)
        assert set(config) == set(hmtl.DEFAULTS)
    expected = ["affectnet8-scratch-none", "affectnet8-imagenet-strong",        # 1
                "affectnet8-sl-b0", "affectnet8-puzzle-b2", "affectnet8-inpaint-b0",  # 2
                "affectnet8-20pct-sl", "affectnet8-20pct-inpaint",               # 3
                "affectnet8-pretrain-inpaint", "affectnet8-finetune",            # 4
                "headpose-puzzle", "gender-celeba-sl", "demo-inpaint"]           # 6, 7, demo
    assert set(expected) <= set(hmtl.RECIPES)
    assert hmtl.recipe("affectnet8-20pct-puzzle")["train_fraction"] == 0.2
    assert hmtl.recipe("affectnet8-pretrain-puzzle")["task_weight"] == 0
    assert hmtl.recipe("affectnet8-inpaint-b2")["arch"] == "b2"
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known: .*demo-sl"):
        hmtl.recipe("nope")


# ----------------------------------------------------------------------------------------------
# bench.py: the benchmark runs and reports what it promises (its numbers are not tested here).

def test_bench_reports_every_contender():
    rows = bench.main(["models", "hmtl", "--arch", "b0", "--size", "32", "--batch", "2",
                       "--steps", "1", "--rounds", "1", "--json"])
    models_rows = [r for r in rows if r["part"] == "models"]
    assert [r["model"] for r in models_rows] == ["hand-written", "hand-written, memory_efficient",
                                                 "torchvision"]
    assert all(r["images_per_s"] > 0 and r["activation_mib"] > 0 for r in models_rows)
    assert models_rows[-1]["ratio_vs_torchvision"] == 1.0
    assert models_rows[1]["activation_mib"] < models_rows[2]["activation_mib"]
    hmtl_rows = [r for r in rows if r["part"] == "hmtl"]
    assert [r["model"] for r in hmtl_rows][0] == "SL" and len(hmtl_rows) == 3
    assert hmtl_rows[0]["ratio_vs_sl"] == 1.0 and all(r["images_per_s"] > 0 for r in hmtl_rows)


# ----------------------------------------------------------------------------------------------
# The repository's promises.

def test_ci_runs_exactly_the_readme_test_command():
    readme = (HERE / "README.md").read_text().splitlines()
    commands = [line for line in readme[:6] if line.startswith("pip install -q -r requirements.txt")]
    assert len(commands) == 2, "the README starts with the two set-up commands"
    assert commands[1] in (HERE / ".ci" / "run").read_text().splitlines()
