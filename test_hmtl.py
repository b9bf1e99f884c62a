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
import models

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
# bench.py: the benchmark runs and reports what it promises (its numbers are not tested here).

def test_bench_models_reports_every_contender():
    rows = bench.main(["--arch", "b0", "--size", "32", "--batch", "2", "--steps", "1",
                       "--rounds", "1", "--json"])
    assert [r["model"] for r in rows] == ["hand-written", "hand-written, memory_efficient",
                                          "torchvision"]
    assert all(r["images_per_s"] > 0 and r["activation_mib"] > 0 for r in rows)
    assert rows[-1]["ratio_vs_torchvision"] == 1.0
    assert rows[1]["activation_mib"] < rows[2]["activation_mib"]


# ----------------------------------------------------------------------------------------------
# The repository's promises.

def test_ci_runs_exactly_the_readme_test_command():
    readme = (HERE / "README.md").read_text().splitlines()
    commands = [line for line in readme[:6] if line.startswith("pip install -q -r requirements.txt")]
    assert len(commands) == 2, "the README starts with the two set-up commands"
    assert commands[1] in (HERE / ".ci" / "run").read_text().splitlines()
